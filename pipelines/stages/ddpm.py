"""Stage 2: the DDPM noise predictor (seed part V) on VAE latents, pixels or 2D vectors.

With `input: <vae stage>` it trains on that VAE's cached latents (latent diffusion) and exports
a `LatentDiffusionPipeline`; on pixels it exports a stock `diffusers.DDPMPipeline` (our
`ImageDiffusionPipeline` when class-conditional, which the stock one is not); on vectors an
`MLPDenoiser` plus its scheduler. `class_conditional: true` learns p(x | class) of labelled
images or latents, sampled with classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ...modules.ddpm import EpsilonPredictionLoss, MLPDenoiser, class_count, variational_bound
from ..diffusion import (ImageDiffusionPipeline, LatentDiffusionPipeline, class_labels_for, denoise, make_sampler,
                         sampler_and_steps)
from ..latents import load_vae
from ..stage_folder import write_space
from .base import Likelihood, require_positive
from .spaces import DataSpaceStage, check_class_conditional, to_data_space


BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> diffusers' names


@dataclass
class DiffusionConfig:
    """What every UNet noise predictor's `model:` block has (the ddpm and sr stage kinds)."""

    # UNet2DModel (images and latents); one entry per resolution level.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    # Forward process.
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    # What the network predicts: the seed's eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x
    # (Salimans & Ho 2022), whose x estimate stays accurate at high noise, where eps's is divided by
    # sqrt(abar_t) ~ 0.006: few-step samplers then start from a sensible image.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # The loss over timesteps: "none" is the seed's (every t alike); "min_snr" weights each t by
    # min(SNR_t, snr_gamma) in x-error terms (Hang et al. 2023), for eps and v alike
    # (modules/ddpm.EpsilonPredictionLoss).
    loss_weighting: Literal["none", "min_snr"] = "none"
    snr_gamma: float = 5.0
    # Latent stage: train on posterior means, or on a fresh posterior sample at every step.
    latents: Literal["mean", "sample"] = "mean"
    # Sampling for previews and evaluation.
    sampler: Literal["ddpm", "ddim", "dpmsolver", "dpmsolver-ode"] = "dpmsolver"
    num_inference_steps: int = 20
    num_eval_samples: int = 1000

    def __post_init__(self):
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(f"attention: {self.attention} needs one entry per level of block_out_channels "
                             f"{self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups: {self.norm_num_groups} does not divide the widths {bad}")
        if not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma: {self.snr_gamma!r} is not valid; expected a number > 0 (Hang et al. 2023: 5)")
        require_positive(self, "num_train_timesteps", "num_inference_steps", "num_eval_samples")
        # DPM-Solver's "leading" spacing steps by T // (steps + 1): it needs fewer steps than T.
        most = self.num_train_timesteps - (self.sampler.startswith("dpmsolver"))
        if self.num_inference_steps > most:
            raise ValueError(f"num_inference_steps: {self.num_inference_steps} is not valid; with num_train_timesteps "
                             f"{self.num_train_timesteps} and sampler {self.sampler} expected at most {most}")

    def make_unet(self, size: int, in_channels: int, out_channels: int,
                  num_class_embeds: int | None = None) -> UNet2DModel:
        """`num_class_embeds`: rows of a class embedding added to the timestep's (None: no classes)."""
        return UNet2DModel(
            sample_size=size, in_channels=in_channels, out_channels=out_channels, num_class_embeds=num_class_embeds,
            block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in self.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention)),
        )

    @property
    def loss_snr_gamma(self) -> float | None:
        """γ of the loss's min-SNR weighting, None for the seed's unweighted loss."""
        return self.snr_gamma if self.loss_weighting == "min_snr" else None

    def passes_per_sample(self) -> str:
        """Network passes per sample of the sampler that evaluates the stage."""
        return f"{self.num_inference_steps} ({self.sampler})"

    def make_train_scheduler(self, clip_sample: bool = False) -> DDPMScheduler:
        """`clip_sample`: samplers clip their estimate of x_0 to [-1, 1], for data known to lie there
        (pixels; diffusers' DDPMPipeline default), never for latents or vectors."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, prediction_type=self.prediction_type,
                             beta_schedule=BETA_SCHEDULES[self.beta_schedule], clip_sample=clip_sample)


@dataclass
class DDPMModelConfig(DiffusionConfig):
    """The `model:` block of a `kind: ddpm` stage: the UNet's, plus an MLPDenoiser for 2D vectors."""

    mlp_hidden: int = 128
    mlp_layers: int = 3
    mlp_fourier_features: int = 6
    # p(x | class) of labelled images or latents (K classes from the data, plus a null class).
    class_conditional: bool = False
    # Training labels dropped to the null class with this probability, so the one network is also
    # the unconditional model that classifier-free guidance needs (Ho & Salimans 2022: 0.1 or 0.2).
    cond_drop_prob: float = 0.1
    # Classifier-free guidance w of evaluation and previews (diffusers' convention: 1 is none).
    guidance_scale: float = 1.0
    # Pixel models: held-out images whose variational bound on -ln p(x) (Ho et al. 2020, eq. 5,
    # modules/ddpm.variational_bound) the end of training reports in bits/dim; 0: none. It costs
    # num_train_timesteps network passes per image (100 digits of 32x32 with mnist_pixel_ddpm's UNet:
    # minutes on a CPU).
    num_bound_images: int = 0

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "mlp_hidden", "mlp_layers")
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob: {self.cond_drop_prob!r} is not valid; expected a probability in [0, 1)")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: {self.guidance_scale!r} is not valid; expected a number >= 0 (1: no "
                             "guidance)")
        if self.num_bound_images < 0:
            raise ValueError(f"num_bound_images: {self.num_bound_images!r} is not valid; expected an integer >= 0")
        if self.guidance_scale != 1 and not (self.class_conditional and self.cond_drop_prob > 0):
            raise ValueError(f"guidance_scale: {self.guidance_scale!r} needs class_conditional: true and "
                             "cond_drop_prob > 0 (guidance combines the conditional and the null-class model)")


class DDPMStage(DataSpaceStage):
    kind = "ddpm"
    model_config = DDPMModelConfig
    monitor = "val_loss"
    description = "a DDPM noise predictor trained on the ε-prediction loss"
    hub_tag = "ddpm"
    exported_classes = (ImageDiffusionPipeline, LatentDiffusionPipeline, MLPDenoiser)
    course_name = "DDPM"
    course_part = 5
    course_verdicts = {
        "efficient sampling": "−",
        "ln p(x) of a datum": "− lower bound only",
        "maximum-likelihood training": "− on a bound (ε-loss)",
        "architecture": "+ free",
        "size of Z": "− z_t the size of x",
        "what else the course says": "+ no encoder to learn",
    }
    card_pipeline_call = ("images = pipe(batch_size=16).images  # PIL images",)
    card_sample_note = "; sampler='ddpm' | 'ddim' | 'dpmsolver' and steps=... choose the sampler"

    def __init__(self, config, data, input_dir: Path | None = None):
        check_class_conditional(config, data, vectors="only a UNet has a class embedding")
        if config.model.num_bound_images and (data.kind != "image" or config.model.class_conditional):
            raise ValueError(f"stages.{config.name}.model.num_bound_images: the variational bound is computed for "
                             f"unconditional pixel-space models (8-bit images), not for this one (data "
                             f"{data.kind}{', class-conditional' if config.model.class_conditional else ''}); set it to 0")
        super().__init__(config, data, input_dir)

    def build_model(self) -> EpsilonPredictionLoss:
        cfg = self.config.model
        if self.data.kind == "vector":
            network = MLPDenoiser(dim=self.data.sample_shape[0], hidden=cfg.mlp_hidden, num_layers=cfg.mlp_layers,
                                  fourier_features=cfg.mlp_fourier_features)
        else:
            channels, size, _ = self.data.sample_shape
            classes = self.data.num_classes + 1 if cfg.class_conditional else None  # + the null class
            network = cfg.make_unet(size, channels, channels, num_class_embeds=classes)
        return EpsilonPredictionLoss(network, cfg.make_train_scheduler(clip_sample=self.data.kind == "image"),
                                     cond_drop_prob=cfg.cond_drop_prob, snr_gamma=cfg.loss_snr_gamma)

    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class-conditional: the labels, where unlabelled items (-1) of a partly labelled set are of
        the null class K (they train the unconditional model)."""
        if not self.config.model.class_conditional:
            return {}
        return {"class_labels": labels.masked_fill(labels < 0, self.data.num_classes)}

    @torch.no_grad()
    def validate(self, model: EpsilonPredictionLoss, loader, accelerator: Accelerator) -> dict[str, float]:
        """The eps-prediction loss on the validation split (latents: their posterior means; class-
        conditional: the true labels, none dropped)."""
        losses = [accelerator.gather_for_metrics(
            model.per_example_loss(self.held_out_input(batch["x"]), **self.conditioning(batch["label"])))
            for batch in loader]
        return {"val_loss": torch.cat(losses).double().mean().item()}

    def generate(self, model: EpsilonPredictionLoss, num_samples: int,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Samples with the configured sampler, in data space (latents decoded); a class-conditional
        model draws `class_labels` (default: balanced, sample i of class i mod K) with the
        configured guidance scale."""
        cfg = self.config.model
        sampler = make_sampler(cfg.sampler, model.scheduler.config)
        shape = (num_samples, *self.data.sample_shape)
        device = next(model.parameters()).device
        labels = class_labels_for(class_count(model.network.config), num_samples, class_labels, cfg.guidance_scale,
                                  device)
        return self.to_data_space(denoise(model.network, sampler, shape, cfg.num_inference_steps, None, device,
                                          class_labels=labels, guidance_scale=cfg.guidance_scale))

    @torch.no_grad()
    def evaluate(self, model: EpsilonPredictionLoss, loader, accelerator: Accelerator) -> dict[str, float]:
        """The data-space metrics, and with `num_bound_images` the variational bound on -ln p(x) of
        that many held-out images, in bits/dim (`nll_bound_bits_per_dim`, the seed's L_T + sum of
        KLs + L_0) with its three terms' shares."""
        metrics = super().evaluate(model, loader, accelerator)
        count = self.config.model.num_bound_images
        if count and accelerator.is_main_process:
            device = next(model.parameters()).device
            images = torch.stack([self.data.validation[i]["x"] for i in range(min(count, len(self.data.validation)))])
            generator = torch.Generator(device).manual_seed(0)
            terms = {name: [] for name in ("prior", "diffusion", "decoder", "total")}
            for batch in images.split(100):
                for name, value in variational_bound(model.network, model.scheduler, batch.to(device),
                                                     generator).items():
                    terms[name].append(value.cpu())
            to_bits = math.log(2) * images[0].numel()
            for name, values in terms.items():
                key = "nll_bound_bits_per_dim" if name == "total" else f"nll_bound_{name}_bits_per_dim"
                metrics[key] = torch.cat(values).mean().item() / to_bits
        return metrics

    def trained_classes(self, model: EpsilonPredictionLoss) -> int | None:
        return class_count(model.network.config)

    def export(self, model: EpsilonPredictionLoss, stage_dir: Path) -> None:
        network, scheduler = model.network, model.scheduler
        if self.data.kind == "latent":
            LatentDiffusionPipeline(load_vae(self.vae_dir, "cpu"), network, scheduler).save_pretrained(stage_dir)
        elif self.config.model.class_conditional:
            ImageDiffusionPipeline(network, scheduler).save_pretrained(stage_dir)  # stock DDPMPipeline takes no labels
        elif self.data.kind == "image":
            DDPMPipeline(network, scheduler).save_pretrained(stage_dir)  # loads in stock diffusers
        else:
            network.save_pretrained(stage_dir / "unet")
            scheduler.save_pretrained(stage_dir / "scheduler")
        write_space(stage_dir, self.kind, self.data.kind)

    @classmethod
    @torch.no_grad()
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None, class_labels: torch.Tensor | None = None,
               guidance_scale: float = 1.0) -> torch.Tensor:
        space = cls.space(stage_dir)
        network_cls = MLPDenoiser if space == "vector" else UNet2DModel
        network = network_cls.from_pretrained(stage_dir / "unet").to(device).eval()
        train_scheduler = DDPMScheduler.from_pretrained(stage_dir / "scheduler")
        sampler, steps = sampler_and_steps(sampler, steps)
        shape = (num_samples, *_network_sample_shape(network))
        labels = class_labels_for(class_count(network.config), num_samples, class_labels, guidance_scale, device)
        z = denoise(network, make_sampler(sampler, train_scheduler.config), shape, steps, generator, device,
                    progress=True, class_labels=labels, guidance_scale=guidance_scale)
        return to_data_space(z, space, stage_dir / "vae")

    @classmethod
    def num_classes(cls, stage_dir: Path) -> int | None:
        return class_count(UNet2DModel.load_config(stage_dir / "unet"))

    @classmethod
    def card_pipeline_lines(cls, stage_dir: Path, block: dict) -> tuple[str, ...]:
        classes = cls.num_classes(stage_dir)
        if classes is None:
            return cls.card_pipeline_call
        label = min(3, classes - 1)
        evaluated = cls.model_config(**(block.get("model") or {})).guidance_scale
        return (f"images = pipe(batch_size=16, class_labels={label}, guidance_scale={evaluated}).images  "
                f"# of class {label}",
                f"# class_labels: 0..{classes - 1}, one int or one per image (default: balanced classes); "
                "guidance_scale: the stage's evaluated w, 1.0: no guidance, larger: closer to the class, less varied")

    @classmethod
    def likelihood(cls, metrics: dict, space: str) -> Likelihood:
        return Likelihood("bound", metrics.get("nll_bound_bits_per_dim"), "bits/dim", "variational bound")

    @classmethod
    def passes_per_sample(cls, block: dict) -> str:
        return cls.model_config(**(block.get("model") or {})).passes_per_sample()

    @classmethod
    def hub_tags(cls, space: str) -> list[str]:
        return [cls.hub_tag] + (["latent-diffusion"] if space == "latent" else [])


def _network_sample_shape(network) -> tuple[int, ...]:
    cfg = network.config
    return (cfg.dim,) if isinstance(network, MLPDenoiser) else (cfg.in_channels, cfg.sample_size, cfg.sample_size)
