"""Stage 2: the DDPM noise predictor (seed part V) on VAE latents, pixels or 2D vectors.

With `input: <vae stage>` it trains on that VAE's cached latents (latent diffusion) and exports
a `LatentDiffusionPipeline`; on pixels it exports a stock `diffusers.DDPMPipeline`; on vectors
an `MLPDenoiser` plus its scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ...modules.ddpm import EpsilonPredictionLoss, MLPDenoiser
from ..diffusion import LatentDiffusionPipeline, denoise, make_sampler, sampler_and_steps
from ..latents import load_vae
from ..stage_folder import write_space
from .base import Likelihood, require_positive
from .spaces import DataSpaceStage, to_data_space


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
        require_positive(self, "num_train_timesteps", "num_inference_steps", "num_eval_samples")
        # DPM-Solver's "leading" spacing steps by T // (steps + 1): it needs fewer steps than T.
        most = self.num_train_timesteps - (self.sampler.startswith("dpmsolver"))
        if self.num_inference_steps > most:
            raise ValueError(f"num_inference_steps: {self.num_inference_steps} is not valid; with num_train_timesteps "
                             f"{self.num_train_timesteps} and sampler {self.sampler} expected at most {most}")

    def make_unet(self, size: int, in_channels: int, out_channels: int) -> UNet2DModel:
        return UNet2DModel(
            sample_size=size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in self.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention)),
        )

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

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "mlp_hidden", "mlp_layers")


class DDPMStage(DataSpaceStage):
    kind = "ddpm"
    model_config = DDPMModelConfig
    monitor = "val_loss"
    description = "a DDPM noise predictor trained on the ε-prediction loss"
    hub_tag = "ddpm"
    exported_classes = (LatentDiffusionPipeline, MLPDenoiser)
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

    def build_model(self) -> EpsilonPredictionLoss:
        cfg = self.config.model
        if self.data.kind == "vector":
            network = MLPDenoiser(dim=self.data.sample_shape[0], hidden=cfg.mlp_hidden, num_layers=cfg.mlp_layers,
                                  fourier_features=cfg.mlp_fourier_features)
        else:
            channels, size, _ = self.data.sample_shape
            network = cfg.make_unet(size, channels, channels)
        return EpsilonPredictionLoss(network, cfg.make_train_scheduler(clip_sample=self.data.kind == "image"))

    @torch.no_grad()
    def validate(self, model: EpsilonPredictionLoss, loader, accelerator: Accelerator) -> dict[str, float]:
        """The eps-prediction loss on the validation split (latents: their posterior means)."""
        losses = [accelerator.gather_for_metrics(model.per_example_loss(self.held_out_input(batch["x"])))
                  for batch in loader]
        return {"val_loss": torch.cat(losses).double().mean().item()}

    def generate(self, model: EpsilonPredictionLoss, num_samples: int) -> torch.Tensor:
        """Samples with the configured sampler, in data space (latents decoded)."""
        cfg = self.config.model
        sampler = make_sampler(cfg.sampler, model.scheduler.config)
        shape = (num_samples, *self.data.sample_shape)
        device = next(model.parameters()).device
        return self.to_data_space(denoise(model.network, sampler, shape, cfg.num_inference_steps, None, device))

    def export(self, model: EpsilonPredictionLoss, stage_dir: Path) -> None:
        network, scheduler = model.network, model.scheduler
        if self.data.kind == "latent":
            LatentDiffusionPipeline(load_vae(self.vae_dir, "cpu"), network, scheduler).save_pretrained(stage_dir)
        elif self.data.kind == "image":
            DDPMPipeline(network, scheduler).save_pretrained(stage_dir)  # loads in stock diffusers
        else:
            network.save_pretrained(stage_dir / "unet")
            scheduler.save_pretrained(stage_dir / "scheduler")
        write_space(stage_dir, self.kind, self.data.kind)

    @classmethod
    @torch.no_grad()
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        space = cls.space(stage_dir)
        network_cls = MLPDenoiser if space == "vector" else UNet2DModel
        network = network_cls.from_pretrained(stage_dir / "unet").to(device).eval()
        train_scheduler = DDPMScheduler.from_pretrained(stage_dir / "scheduler")
        sampler, steps = sampler_and_steps(sampler, steps)
        shape = (num_samples, *_network_sample_shape(network))
        z = denoise(network, make_sampler(sampler, train_scheduler.config), shape, steps, generator, device,
                    progress=True)
        return to_data_space(z, space, stage_dir / "vae")

    @classmethod
    def likelihood(cls, metrics: dict, space: str) -> Likelihood:
        return Likelihood("bound")  # not evaluated yet

    @classmethod
    def passes_per_sample(cls, block: dict) -> str:
        return cls.model_config(**(block.get("model") or {})).passes_per_sample()

    @classmethod
    def hub_tags(cls, space: str) -> list[str]:
        return [cls.hub_tag] + (["latent-diffusion"] if space == "latent" else [])


def _network_sample_shape(network) -> tuple[int, ...]:
    cfg = network.config
    return (cfg.dim,) if isinstance(network, MLPDenoiser) else (cfg.in_channels, cfg.sample_size, cfg.sample_size)
