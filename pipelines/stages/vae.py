"""Stage 1: the VAE auto-encoder (seed part IV), exported as a stock diffusers `AutoencoderKL`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from einops import rearrange

from ...modules.gan import GAN_LOSSES, PatchDiscriminator
from ...modules.likelihood import bits_per_dim, dequantize
from ...modules.metrics import psnr, ssim
from ...modules.vae import RECONSTRUCTIONS, AdversarialVAE, GaussianVAE, make_autoencoder
from ..evaluation import patch_realism
from ..latents import decode_prior, load_vae
from .base import Likelihood, Stage, require_positive


@dataclass
class VAEModelConfig:
    """The `model:` block of a `kind: vae` stage."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 32
    decoder_log_var: float = 0.0
    # How sigma_x^2 is set (modules/vae.py's DECODER_VARIANCES): "learned" by gradient from
    # decoder_log_var, "optimal" (each batch's maximum-likelihood value, tracked for evaluation) or
    # "fixed" at decoder_log_var.
    decoder_variance: Literal["learned", "optimal", "fixed"] = "learned"
    kl_weight: float = 1.0
    # Train and evaluate on uniformly dequantized pixels, so the ELBO bounds a density on
    # continuous data and bits/dim are comparable with flows (modules/likelihood.py).
    dequantize: bool = True
    # Latent diffusion's autoencoder recipe (modules/vae.py's AdversarialVAE): the training's
    # reconstruction term ("l1"/"l2" leave sigma_x^2 at decoder_log_var; validation still reports
    # the Gaussian ELBO), and a patch discriminator whose adaptively weighted term is switched on
    # after disc_start steps; disc_weight 0 trains without one (one parameter group).
    reconstruction: Literal["gaussian", "l1", "l2"] = "gaussian"
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_loss: Literal["standard", "hinge"] = "hinge"
    disc_channels: int = 64  # the patch discriminator's first width (doubled per layer, up to 8x)
    disc_layers: int = 2  # its stride-2 convs: a 34-pixel receptive field (3: 70)

    def __post_init__(self):
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels: {self.block_out_channels!r} is not valid; "
                             "expected a non-empty list of positive widths, e.g. [32, 64, 64]")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups: {self.norm_num_groups} does not divide the widths {bad} "
                             f"of block_out_channels {self.block_out_channels}")
        require_positive(self, "latent_channels")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight: {self.kl_weight!r} is not valid; expected a number >= 0")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction: {self.reconstruction!r} is not valid; expected one of "
                             f"{', '.join(RECONSTRUCTIONS)}")
        if self.disc_weight < 0:
            raise ValueError(f"disc_weight: {self.disc_weight!r} is not valid; expected a number >= 0 "
                             "(0: no discriminator)")
        if self.disc_start < 0:
            raise ValueError(f"disc_start: {self.disc_start!r} is not valid; expected an integer >= 0")
        if self.disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss: {self.disc_loss!r} is not valid; expected one of {', '.join(GAN_LOSSES)}")
        require_positive(self, "disc_channels", "disc_layers")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def adversarial(self) -> bool:
        return self.disc_weight > 0


class VAEStage(Stage):
    kind = "vae"
    model_config = VAEModelConfig
    monitor = "neg_elbo_nats"
    description = ("a variational autoencoder (`AutoencoderKL`) trained on the ELBO; it samples by decoding "
                   "z ~ N(0, I)")
    hub_tag = "vae"
    preview_caption = ("top: validation images and their reconstructions, in pairs of rows; "
                       "bottom: decoded prior samples")
    course_name = "VAE"
    course_part = 4
    course_verdicts = {
        "efficient sampling": "+ one decoder pass per sample",
        "ln p(x) of a datum": "− lower bound only",
        "maximum-likelihood training": "− on the ELBO",
        "architecture": "+ free",
        "size of Z": "+ free",
        "what else the course says": "− diagonal Gaussian conditionals",
    }

    def __init__(self, config, data, input_dir=None):
        super().__init__(config, data, input_dir)
        if data.kind != "image":
            raise ValueError(f"stages.{config.name}: a vae stage needs image data, got {data.kind} data")
        channels, height, width = data.sample_shape
        factor = config.model.downsampling_factor
        if height % factor or width % factor:
            raise ValueError(
                f"stages.{config.name}.model.block_out_channels: {len(config.model.block_out_channels)} blocks "
                f"downsample by {factor}, which does not divide the resolution {height}x{width}")
        if config.model.adversarial:
            layers = config.model.disc_layers
            if PatchDiscriminator.logit_map_size(min(height, width), layers) < 1:
                raise ValueError(f"stages.{config.name}.model.disc_layers: {layers} stride-2 convs leave no patch "
                                 f"of a {height}x{width} image; expected fewer layers")
            if config.training.gradient_accumulation_steps != 1:
                raise ValueError(f"stages.{config.name}.training.gradient_accumulation_steps: a vae stage with a "
                                 "discriminator (model.disc_weight > 0) steps two optimizers every step; it needs 1")

    def build_model(self) -> GaussianVAE:
        cfg = self.config.model
        channels, resolution, _ = self.data.sample_shape
        autoencoder = make_autoencoder(channels, resolution, cfg.block_out_channels, cfg.latent_channels,
                                       cfg.layers_per_block, cfg.norm_num_groups)
        if not cfg.adversarial:
            return GaussianVAE(autoencoder, cfg.decoder_log_var, cfg.decoder_variance, cfg.kl_weight,
                               cfg.reconstruction)
        discriminator = PatchDiscriminator(in_channels=channels, base_channels=cfg.disc_channels,
                                           num_layers=cfg.disc_layers)
        return AdversarialVAE(autoencoder, discriminator, cfg.decoder_log_var, cfg.decoder_variance,
                              cfg.kl_weight, cfg.reconstruction, cfg.disc_weight, cfg.disc_start, cfg.disc_loss)

    @classmethod
    def several_parameter_groups(cls, model_config: VAEModelConfig) -> bool:
        return model_config.adversarial

    def parameter_groups(self, model: GaussianVAE) -> dict[str, list[torch.nn.Parameter]]:
        """One group without a discriminator; with one, the autoencoder's (with ln sigma_x^2 when
        learned), then the discriminator's, in taming-transformers' order."""
        if not self.config.model.adversarial:
            return super().parameter_groups(model)
        autoencoder = [p for p in model.parameters() if p.requires_grad]
        discriminator = list(model.discriminator.parameters())
        in_discriminator = {id(p) for p in discriminator}
        return {"autoencoder": [p for p in autoencoder if id(p) not in in_discriminator],
                "discriminator": discriminator}

    def phase_due(self, phase: str, step: int) -> bool:
        # The discriminator is idle for the first disc_start steps, as is the adversarial term
        # (AdversarialVAE counts the same steps).
        return phase != "discriminator" or step > self.config.model.disc_start

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize(x) if self.config.model.dequantize else x

    @torch.no_grad()
    def validate(self, model: GaussianVAE, loader, accelerator: Accelerator) -> dict[str, float]:
        """The true bound (beta = 1) on the validation split: negative ELBO in nats and bits/dim,
        its reconstruction and KL terms, and the mean squared error of the posterior-mean reconstruction."""
        sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        count = 0
        for batch in loader:
            x = self.training_input(batch["x"])
            with accelerator.autocast():
                terms = model.terms(x)
                recon = model.autoencoder.decode(model.autoencoder.encode(x).latent_dist.mean).sample
            mse = (recon.float() - x).pow(2).flatten(1).mean(1)
            per_datum = torch.stack([terms["nll"] + terms["kl"], terms["nll"], terms["kl"], mse], 1)
            per_datum = accelerator.gather_for_metrics(per_datum)
            sums += per_datum.double().sum(0)
            count += per_datum.shape[0]
        neg_elbo, nll, kl, mse = (sums / count).tolist()
        num_dims = int(torch.tensor(self.data.sample_shape).prod())
        metrics = {"neg_elbo_nats": neg_elbo, "recon_nll_nats": nll, "kl_nats": kl, "recon_mse": mse,
                   "decoder_log_var": float(model.decoder_log_var)}
        if self.config.model.dequantize:
            metrics["neg_elbo_bits_per_dim"] = bits_per_dim(neg_elbo, num_dims)
        return metrics

    @torch.no_grad()
    def evaluate(self, model: GaussianVAE, loader, accelerator: Accelerator) -> dict[str, float]:
        """`validate`, plus the fidelity of the posterior-mean reconstructions of the held-out
        split: PSNR and SSIM against the originals, and `patch_realism` (SWD) of the reconstructions
        against them, which a blurred reconstruction fails however good its PSNR."""
        metrics = self.validate(model, loader, accelerator)
        originals, reconstructions = [], []
        for batch in loader:
            with accelerator.autocast():
                recon = model.autoencoder.decode(model.autoencoder.encode(batch["x"]).latent_dist.mean).sample
            originals.append(accelerator.gather_for_metrics(batch["x"]).cpu())
            reconstructions.append(accelerator.gather_for_metrics(recon.float().clamp(-1, 1)).cpu())
        if accelerator.is_main_process:
            x, x_hat = torch.cat(originals), torch.cat(reconstructions)
            metrics.update(recon_psnr=psnr(x_hat, x).mean().item(), recon_ssim=ssim(x_hat, x).mean().item(),
                           **{f"recon_{name}": value for name, value in patch_realism(x_hat, x).items()})
        return metrics

    @torch.no_grad()
    def preview(self, model: GaussianVAE, batch: torch.Tensor) -> torch.Tensor:
        """Rows: 8 validation images, their reconstructions (twice), then decoded prior samples."""
        x = batch[:16]
        recon = model.autoencoder.decode(model.autoencoder.encode(x).latent_dist.mean).sample
        # Pad to whole rows of 8 (black), so a validation split of fewer than 16 images still lines up.
        padding = x.new_full(((-len(x)) % 8, *x.shape[1:]), -1.0)
        x, recon = torch.cat([x, padding]), torch.cat([recon, padding])
        pairs = rearrange(torch.stack([x, recon]), "two (r n) ... -> (r two n) ...", n=8)
        samples = decode_prior(model.autoencoder, 32, None, x.device)
        return torch.cat([pairs, samples]).clamp(-1, 1)

    @torch.no_grad()
    def finalize(self, model: GaussianVAE, loader, accelerator: Accelerator) -> dict[str, float]:
        """Latent scaling factor for stage 2: 1 / std of the posterior means over the training set
        (what latent diffusion calls `scaling_factor`; saved in the VAE's config.json)."""
        moments = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        for batch in loader:
            with accelerator.autocast():
                z = model.autoencoder.encode(batch["x"]).latent_dist.mean.double()
            z = accelerator.gather_for_metrics(z)  # each training example once, padding dropped
            moments += torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(z.numel(), device=z.device)])
        total, total_sq, n = moments.tolist()
        std = (total_sq / n - (total / n) ** 2) ** 0.5
        model.autoencoder.register_to_config(scaling_factor=1.0 / std)
        return {"latent_std": std, "scaling_factor": 1.0 / std}

    def export(self, model: GaussianVAE, stage_dir: Path) -> None:
        model.autoencoder.save_pretrained(stage_dir / "vae", safe_serialization=True)

    @classmethod
    @torch.no_grad()
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        return decode_prior(load_vae(stage_dir / "vae", device), num_samples, generator, device)

    @classmethod
    def space(cls, stage_dir: Path) -> str:
        return "image"  # a VAE encodes and decodes images; its folder needs no space file

    @classmethod
    def likelihood(cls, metrics: dict, space: str) -> Likelihood:
        return Likelihood("bound", metrics.get("neg_elbo_bits_per_dim"), "bits/dim", "−ELBO")

    @classmethod
    def passes_per_sample(cls, block: dict) -> str:
        return "1 (decoder)"

