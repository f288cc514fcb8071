"""The seed's variational auto-encoder (part IV) around diffusers' `AutoencoderKL`.

Encoder q(z|x) = N(mu_z|x, diag sigma^2_z|x), decoder p(x|z) = N(x_hat(z), sigma_x^2 I) with a
fixed or learned scalar log-variance, prior p(z) = N(0, I). One datum's loss is the negative
ELBO with one reparameterized sample, as in the seed:

    L_i = -ln N(x_i; x_hat(mu + sigma * eps), sigma_x^2 I) + beta * KL(N(mu, sigma^2) || N(0, I)),
    eps ~ N(0, I),

with beta = 1 the true bound (beta != 1 is the usual beta-VAE knob for latent diffusion).
"""

import math

import torch
from diffusers import AutoencoderKL
from torch import nn

from .divergences import kl_std_normal


def make_autoencoder(
    channels: int,
    resolution: int,
    block_out_channels: list[int],
    latent_channels: int,
    layers_per_block: int,
    norm_num_groups: int,
) -> AutoencoderKL:
    """An `AutoencoderKL` that downsamples by 2 ** (len(block_out_channels) - 1).

    `AutoencoderKL` downsamples once per block but the last, so 32x32 -> 8x8 takes three blocks.
    """
    num_blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
        scaling_factor=1.0,  # set from the training latents' std once training ends
    )


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-ln N(x; mean, exp(log_var) I), summed over all but the batch dim. Returns (B,)."""
    per_dim = 0.5 * ((x - mean) ** 2 * torch.exp(-log_var) + log_var + math.log(2 * math.pi))
    return per_dim.flatten(1).sum(1)


class GaussianVAE(nn.Module):
    """`AutoencoderKL` plus the seed's Gaussian decoder likelihood and ELBO.

    Args:
        autoencoder: the encoder/decoder network.
        decoder_log_var: initial (or fixed) ln sigma_x^2 of the decoder's Gaussian.
        learn_decoder_variance: learn ln sigma_x^2 as one scalar (as latent diffusion's VAE does).
        kl_weight: beta in front of the KL term during training.
    """

    def __init__(self, autoencoder: AutoencoderKL, decoder_log_var: float = 0.0,
                 learn_decoder_variance: bool = True, kl_weight: float = 1.0):
        super().__init__()
        self.autoencoder = autoencoder
        self.decoder_log_var = nn.Parameter(torch.tensor(float(decoder_log_var)),
                                            requires_grad=learn_decoder_variance)
        self.kl_weight = kl_weight

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-datum ELBO terms in nats, each (B,): reconstruction NLL and KL."""
        posterior = self.autoencoder.encode(x).latent_dist  # mean, logvar: (B, c, h, w)
        # Reparameterization trick: z = mu + sigma * eps, one sample per datum.
        mean = posterior.mean
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        z = mean + posterior.std * eps
        x_hat = self.autoencoder.decode(z).sample
        nll = gaussian_nll(x, x_hat, self.decoder_log_var.to(x_hat.dtype))
        kl = kl_std_normal(posterior.mean.float(), posterior.logvar.float())
        return {"nll": nll.float(), "kl": kl}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss: batch mean of nll + beta * kl, divided by the number of dimensions so
        that learning rates and gradient clipping do not depend on the image size."""
        terms = self.terms(x)
        num_dims = x[0].numel()
        loss = (terms["nll"] + self.kl_weight * terms["kl"]).mean() / num_dims
        return {"loss": loss, "nll": terms["nll"].mean(), "kl": terms["kl"].mean(),
                "decoder_log_var": self.decoder_log_var.detach()}
