"""The seed's variational auto-encoder (part IV) around diffusers' `AutoencoderKL`.

Encoder q(z|x) = N(mu_z|x, diag sigma^2_z|x), decoder p(x|z) = N(x_hat(z), sigma_x^2 I) with a
fixed, learned or calibrated scalar variance (`DECODER_VARIANCES`), prior p(z) = N(0, I). One datum's loss is the negative
ELBO with one reparameterized sample, as in the seed:

    L_i = -ln N(x_i; x_hat(mu + sigma * eps), sigma_x^2 I) + beta * KL(N(mu, sigma^2) || N(0, I)),
    eps ~ N(0, I),

with beta = 1 the true bound (beta != 1 is the usual beta-VAE knob for latent diffusion).

Latent diffusion's autoencoder (Rombach et al. 2022, after Esser et al. 2021's VQGAN) trades the
Gaussian likelihood for sharper reconstructions: an L1 (or L2) reconstruction term, and a patch
discriminator whose adversarial term is weighted adaptively at the decoder's last layer
(`AdversarialVAE`, `adaptive_weight`). The perceptual (LPIPS) term of that recipe needs pretrained
VGG weights and is not implemented.
"""

import math

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from .divergences import kl_std_normal
from .gan import GAN_LOSSES, PatchDiscriminator, discriminator_loss, generator_loss

RECONSTRUCTIONS = ("gaussian", "l1", "l2")
# How sigma_x^2 is set: "fixed" at its initial value; "learned" by gradient descent, one scalar (as
# latent diffusion's VAE does); "optimal": the value that maximises the likelihood of the batch,
# sigma*^2 = mean (x - x_hat)^2 (sigma-VAE, Rybkin et al. 2021), tracked for evaluation (`GaussianVAE`).
DECODER_VARIANCES = ("learned", "optimal", "fixed")
# The optimal variance's running mean: its horizon, about 1 / (1 - momentum) = 100 training steps,
# follows the falling reconstruction error closely and averages over batches.
OPTIMAL_VARIANCE_MOMENTUM = 0.99


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


def reconstruction_error(x: Tensor, x_hat: Tensor, kind: str) -> Tensor:
    """The non-probabilistic reconstruction terms, summed over all but the batch dim. Returns (B,).

    "l1": sum |x - x_hat| (latent diffusion's and VQGAN's pixel loss); "l2": sum (x - x_hat)^2.
    """
    if kind == "l1":
        return (x - x_hat).abs().flatten(1).sum(1)
    if kind == "l2":
        return (x - x_hat).pow(2).flatten(1).sum(1)
    raise ValueError(f"unknown reconstruction {kind!r}; valid here: l1, l2")


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, delta: float = 1e-4,
                    max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_adv|| + delta), clamped to [0, max_weight]
    and detached (Esser et al. 2021, eq. 7; taming-transformers' `calculate_adaptive_weight`).

    G_L is the decoder's last layer: scaling the adversarial term by lambda makes its gradient there
    as large as the reconstruction term's, whatever the two losses' scales. The graph is retained
    for the backward pass of the total loss. Returns ().
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(adv_grad) + delta)
    return weight.clamp(0.0, max_weight).detach()


class GaussianVAE(nn.Module):
    """`AutoencoderKL` plus the seed's Gaussian decoder likelihood and ELBO.

    Args:
        autoencoder: the encoder/decoder network.
        decoder_log_var: initial (or fixed) ln sigma_x^2 of the decoder's Gaussian.
        decoder_variance: how sigma_x^2 is set (`DECODER_VARIANCES`). "learned": by gradient, only
            with the "gaussian" reconstruction, the one term it enters. "optimal": each training
            batch's Gaussian NLL uses its own maximum-likelihood variance, the batch's mean squared
            error (detached), so the reconstruction term is (D/2) ln MSE + const: the decoder is
            calibrated from the first step instead of after ln sigma_x^2 has crept down at the
            learning rate's pace. `decoder_log_var` then holds ln of the running mean of that
            variance over training batches, the sigma_x^2 that evaluation and export use: fixed
            before any held-out datum is seen, so the validation ELBO stays a true bound. Each
            process tracks its own batches; the main process's value is the one saved.
        kl_weight: beta in front of the KL term during training.
        reconstruction: the training loss's reconstruction term: "gaussian" (the seed's
            -ln N(x; x_hat, sigma_x^2 I)), "l1" or "l2" (`reconstruction_error`). Whatever it is,
            `terms` gives the Gaussian NLL, so validation reports a true bound.
    """

    def __init__(self, autoencoder: AutoencoderKL, decoder_log_var: float = 0.0,
                 decoder_variance: str = "learned", kl_weight: float = 1.0, reconstruction: str = "gaussian"):
        super().__init__()
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction {reconstruction!r}; valid: {', '.join(RECONSTRUCTIONS)}")
        if decoder_variance not in DECODER_VARIANCES:
            raise ValueError(f"unknown decoder_variance {decoder_variance!r}; valid: {', '.join(DECODER_VARIANCES)}")
        self.autoencoder = autoencoder
        self.decoder_log_var = nn.Parameter(torch.tensor(float(decoder_log_var)),
                                            requires_grad=decoder_variance == "learned" and reconstruction == "gaussian")
        self.decoder_variance = decoder_variance
        self.kl_weight = kl_weight
        self.reconstruction = reconstruction

    def sample_reconstruction(self, x: Tensor):
        """q(z|x) and x_hat = decoder(z) for one reparameterized sample z. Returns (posterior, x_hat)."""
        posterior = self.autoencoder.encode(x).latent_dist  # mean, logvar: (B, c, h, w)
        # Reparameterization trick: z = mu + sigma * eps, one sample per datum.
        mean = posterior.mean
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        z = mean + posterior.std * eps
        return posterior, self.autoencoder.decode(z).sample  # x_hat: (B, C, H, W)

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-datum ELBO terms in nats, each (B,): reconstruction NLL and KL (and, for "l1"/"l2",
        the training's reconstruction term)."""
        return self._terms(x, *self.sample_reconstruction(x))

    def _terms(self, x: Tensor, posterior, x_hat: Tensor) -> dict[str, Tensor]:
        nll = gaussian_nll(x, x_hat, self._decoder_log_var(x, x_hat).to(x_hat.dtype))
        kl = kl_std_normal(posterior.mean.float(), posterior.logvar.float())
        terms = {"nll": nll.float(), "kl": kl}
        if self.reconstruction != "gaussian":
            terms["reconstruction"] = reconstruction_error(x, x_hat, self.reconstruction).float()
        return terms

    def _decoder_log_var(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """ln sigma_x^2 for this batch's NLL: the parameter, except in training with the "optimal"
        variance, where it is ln of the batch's mean squared error and the parameter takes a step
        of its running mean (see the class docstring)."""
        if not (self.training and self.decoder_variance == "optimal"):
            return self.decoder_log_var
        # In x's precision (float32 under bf16 autocast too). Dequantized data never reconstructs
        # exactly; the floor only keeps ln finite without dequantization.
        mse = (x - x_hat.detach()).pow(2).mean().clamp_min(1e-12)
        with torch.no_grad():
            running = self.decoder_log_var.exp().lerp(mse, 1 - OPTIMAL_VARIANCE_MOMENTUM)
            self.decoder_log_var.copy_(running.log())
        return mse.log()

    def _loss(self, terms: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        """Training loss: batch mean of rec + beta * kl (rec the Gaussian NLL or the l1/l2 term),
        divided by the number of dimensions so that learning rates and gradient clipping do not
        depend on the image size."""
        num_dims = x[0].numel()
        rec = terms.get("reconstruction", terms["nll"])
        loss = (rec + self.kl_weight * terms["kl"]).mean() / num_dims
        out = {"loss": loss, "nll": terms["nll"].mean(), "kl": terms["kl"].mean(),
               "decoder_log_var": self.decoder_log_var.detach()}
        if "reconstruction" in terms:
            out[self.reconstruction] = terms["reconstruction"].mean()
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Training loss (`_loss`) and its terms' batch means."""
        return self._loss(self.terms(x), x)


class AdversarialVAE(GaussianVAE):
    """`GaussianVAE` plus a patch discriminator: latent diffusion's autoencoder recipe (Rombach et
    al. 2022, appendix G; Esser et al. 2021, eq. 5-7), without its perceptual term.

    Two parameter groups with one loss each, stepped in this order by the one training loop:

      "autoencoder" (the autoencoder, and ln sigma_x^2 when learned):
          L = (rec + beta * KL) / D + disc_weight * lambda * L_adv(D(x_hat)),
          L_adv the generator's loss on the patch logits of x_hat ("hinge": -mean l; "standard":
          the non-saturating softplus(-l)), lambda = `adaptive_weight` of the rec / D and L_adv
          gradients at the decoder's last conv. Before `disc_start` steps, the adversarial term and
          lambda are 0 and the discriminator is not evaluated;
      "discriminator" (the discriminator only): `discriminator_loss` on the patch logits of x and of
          its reconstruction (no gradient reaches the autoencoder): the one the autoencoder phase
          just made of the same batch, detached (one autoencoder pass per step instead of two:
          the disc phases run 1.5x faster), else a fresh one. The stage skips this phase for the
          first `disc_start` steps (`phase_due`).

    The module counts its training-mode autoencoder phases (`num_steps`, a buffer, so checkpoints
    carry it): one per optimizer step, which assumes no gradient accumulation.

    Args:
        autoencoder, decoder_log_var, decoder_variance, kl_weight, reconstruction: as in
            `GaussianVAE`.
        discriminator: the patch discriminator (logit maps).
        disc_weight: the factor in front of lambda * L_adv (taming's `disc_weight`).
        disc_start: steps trained on the reconstruction and KL terms alone (taming's `disc_start`).
        disc_loss: "hinge" or "standard" (modules/gan.py's losses).
    """

    def __init__(self, autoencoder: AutoencoderKL, discriminator: PatchDiscriminator, decoder_log_var: float = 0.0,
                 decoder_variance: str = "learned", kl_weight: float = 1.0, reconstruction: str = "gaussian",
                 disc_weight: float = 1.0, disc_start: int = 0, disc_loss: str = "hinge"):
        super().__init__(autoencoder, decoder_log_var, decoder_variance, kl_weight, reconstruction)
        if disc_loss not in GAN_LOSSES:
            raise ValueError(f"unknown disc_loss {disc_loss!r}; valid: {', '.join(GAN_LOSSES)}")
        self.discriminator = discriminator
        self.disc_weight, self.disc_start, self.disc_loss = disc_weight, disc_start, disc_loss
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._steps = 0  # num_steps on the host: reading the buffer would wait on a GPU every step
        self._last_reconstruction: tuple[Tensor, Tensor] | None = None  # (x, detached x_hat) of the last phase

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict (a resume), also as a submodule
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = int(self.num_steps)

    @property
    def adversarial(self) -> bool:
        """Whether the next autoencoder phase has the adversarial term (disc_start steps done)."""
        return self._steps >= self.disc_start

    def autoencoder_terms(self, x: Tensor) -> dict[str, Tensor]:
        """The autoencoder's loss (see the class docstring) and its terms' batch means, all ()."""
        posterior, x_hat = self.sample_reconstruction(x)
        terms = self._terms(x, posterior, x_hat)
        out = self._loss(terms, x)
        zero = torch.zeros((), device=x.device)
        adv_loss, weight = zero, zero
        if self.adversarial:
            adv_loss = generator_loss(self.discriminator(x_hat).flatten(), self.disc_loss)  # patches as data
            if torch.is_grad_enabled():  # no gradients (evaluation): lambda = 0, as in the reference
                rec_loss = terms.get("reconstruction", terms["nll"]).mean() / x[0].numel()
                weight = adaptive_weight(rec_loss, adv_loss, self.autoencoder.decoder.conv_out.weight)
            out["loss"] = out["loss"] + self.disc_weight * weight * adv_loss
        if self.training:
            self.num_steps += 1
            self._steps += 1
            self._last_reconstruction = (x, x_hat.detach())
        return {**out, "adv_loss": adv_loss.detach(), "adaptive_weight": weight}

    def discriminator_terms(self, x: Tensor) -> dict[str, Tensor]:
        """The discriminator's loss on the patches of x (real) and of its reconstruction (fake: the
        autoencoder phase's of this same batch, else a fresh one), with the mean logits of each, all ()."""
        last, self._last_reconstruction = self._last_reconstruction, None
        if last is not None and last[0] is x:
            x_hat = last[1]
        else:
            with torch.no_grad():
                _, x_hat = self.sample_reconstruction(x)
        real_logits = self.discriminator(x.detach())  # (B, 1, h, w)
        fake_logits = self.discriminator(x_hat)  # (B, 1, h, w)
        return {"loss": discriminator_loss(real_logits.flatten(), fake_logits.flatten(), self.disc_loss),
                "logits_real": real_logits.detach().mean(), "logits_fake": fake_logits.detach().mean()}

    def forward(self, x: Tensor, phase: str = "autoencoder") -> dict[str, Tensor]:
        """`autoencoder_terms` or `discriminator_terms` by `phase`, through forward so that a DDP
        wrapper synchronises the gradients."""
        if phase == "autoencoder":
            return self.autoencoder_terms(x)
        if phase == "discriminator":
            return self.discriminator_terms(x)
        raise ValueError(f"phase must be 'autoencoder' or 'discriminator', got {phase!r}")
