"""Super-resolution (seed parts I and V): p(X | Y), X an image and Y its low-resolution version.

Training pairs come from any image dataset: Y = bicubic_down(blur(X), scale) is made from X on the
fly. In pixel space (SR3, Saharia et al. 2021) the UNet sees [x_t, bicubic_up(Y)]; with
`input: <vae stage>` (latent diffusion's SR model, Rombach et al. 2022) it denoises that VAE's
cached latents of X and sees [z_t, Y resized to the latent's size]. `objective: regression` trains
the seed's supervised regressor g(Y) ~ X with L2 on the same UNet, the baseline SR is measured
against. Exports a `SuperResolutionPipeline`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from ...modules.ddpm import EpsilonPredictionLoss
from ...modules.sr import RegressionLoss, add_noise, downsample, resize
from ..data import DataSplits, InMemoryDataset
from ..diffusion import SuperResolutionPipeline, fold_scaling_factor, make_sampler, super_resolve
from ..evaluation import super_resolution_metrics
from ..latents import load_vae, sample_posterior
from ..stage_folder import write_space
from .ddpm import DiffusionConfig
from .spaces import DataSpaceStage


@dataclass
class SRModelConfig(DiffusionConfig):
    """The `model:` block of a `kind: sr` stage: the UNet and schedule of a DDPM, plus the task."""

    scale: int = 4
    objective: Literal["diffusion", "regression"] = "diffusion"
    blur_sigma: float = 0.0  # Gaussian blur (in high-resolution pixels) before downsampling
    # Conditioning augmentation (Ho et al., "Cascaded Diffusion Models", 2022): Gaussian noise
    # added to the condition at training time only, so the model does not copy its finest detail.
    condition_noise_std: float = 0.0
    # Pixel space: the model's target is the detail bicubic misses, x - bicubic_up(y), and its output
    # is added to bicubic_up(y): VDSR's global residual for the regressor (Kim et al. 2016), residual
    # diffusion for SR3 (SRDiff, Li et al. 2022). Short trainings reach it far sooner than x itself.
    residual: bool = False
    # The residual times this is the model's target: the detail is small (std 0.15 on photos in
    # [-1, 1], against 0.58 for the images), and a diffusion schedule made for unit-scale data
    # would spend its steps on noise that drowns it.
    residual_scale: float = 1.0
    num_eval_samples: int = 500

    def __post_init__(self):
        super().__post_init__()
        if self.scale < 2:
            raise ValueError(f"scale: {self.scale!r} is not valid; expected an integer >= 2 (e.g. 2 or 4)")
        for key in ("blur_sigma", "condition_noise_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not valid; expected a number >= 0")
        if self.residual_scale <= 0:
            raise ValueError(f"residual_scale: {self.residual_scale!r} is not valid; expected a number > 0")
        if self.residual_scale != 1 and not self.residual:
            raise ValueError(f"residual_scale: {self.residual_scale!r} scales the residual; it needs residual: true")


class SRStage(DataSpaceStage):
    kind = "sr"
    model_config = SRModelConfig
    monitor = "val_loss"
    description = ("a super-resolution model: a UNet conditioned on the low-resolution image, trained on the "
                   "conditional ε-prediction loss (or, with `objective: regression`, the L2 regressor)")
    hub_tag = "super-resolution"
    hub_pipeline_tag = "image-to-image"
    evaluation_task = "sr"
    exported_classes = (SuperResolutionPipeline,)
    preview_caption = "low-resolution input, samples, ground truth"
    card_pipeline_call = ("from PIL import Image",
                          'high_res = pipe(Image.open("low_res.png"), num_inference_steps=20).images[0]')

    def __init__(self, config, data: DataSplits, input_dir: Path | None = None):
        if data.kind != "image":
            raise ValueError(f"stages.{config.name}: a super-resolution stage needs image data, not {data.kind}s")
        resolution = data.sample_shape[-1]
        if resolution % config.model.scale:
            raise ValueError(f"stages.{config.name}.model.scale: {config.model.scale} does not divide the data's "
                             f"resolution {resolution}")
        if config.model.residual and config.input is not None:
            raise ValueError(f"stages.{config.name}.model.residual: a residual adds the upsampled input to the "
                             f"output, which a latent model (input: {config.input}) does not produce in pixels")
        super().__init__(config, data, input_dir)
        self.image_channels = data.sample_shape[0]

    def setup(self, accelerator: Accelerator, stage_dir: Path) -> None:
        """Latent models: cache the VAE's latents of X, and append Y (at the latent's size) as channels."""
        super().setup(accelerator, stage_dir)
        if self.vae_dir is None:
            return
        latent_size = tuple(self.data.sample_shape[1:])
        splits = {}
        for split in ("train", "validation"):
            latents, pixels = getattr(self.data, split), getattr(self.pixel_data, split)
            high_res = torch.stack([item["x"] for item in pixels])
            condition = resize(downsample(high_res, self.config.model.scale, self.config.model.blur_sigma),
                               latent_size)
            splits[split] = InMemoryDataset(torch.cat([latents.samples, condition], 1), latents.labels)
        self.data = dataclasses.replace(self.data, **splits)

    def build_model(self) -> EpsilonPredictionLoss | RegressionLoss:
        cfg = self.config.model
        channels, size, _ = self.data.sample_shape
        if cfg.objective == "regression":
            return RegressionLoss(cfg.make_unet(size, self.image_channels, channels), self.image_channels)
        # Samplers clip x_0 estimates to [-1, 1] where the target is pixels: SR3 on x (photos_sr's
        # x-target SR3, 100 held-out crops: PSNR 16.99 -> 17.06, consistency 22.62 -> 22.69 dB, SWD
        # 125.9 -> 125.2), never a residual (its scaled detail leaves [-1, 1]) or latents.
        clip = self.vae_dir is None and not cfg.residual
        return EpsilonPredictionLoss(cfg.make_unet(size, channels + self.image_channels, channels),
                                     cfg.make_train_scheduler(clip_sample=clip), condition_channels=self.image_channels,
                                     snr_gamma=cfg.loss_snr_gamma)

    def pair(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """A data batch -> [target, condition] on the channel axis, what the training module splits.

        Pixels: target X (with `residual`: (X - bicubic_up(Y)) * residual_scale), condition
        bicubic_up(Y). Latents (cached with Y): the posterior mean or a posterior sample of z, and
        Y. At training time the condition gets its augmentation noise.
        """
        cfg = self.config.model
        if self.vae_dir is None:
            condition = resize(downsample(x, cfg.scale, cfg.blur_sigma), tuple(x.shape[-2:]))
            target = (x - condition) * cfg.residual_scale if cfg.residual else x
        else:
            target, condition = x[:, : -self.image_channels], x[:, -self.image_channels:]
            if not train or cfg.latents == "mean":
                target = target[:, : self.data.sample_shape[0]]
            else:
                target = sample_posterior(target)
        if train:
            condition = add_noise(condition, cfg.condition_noise_std)
        return torch.cat([target, condition], 1)

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(x, train=True)

    @torch.no_grad()
    def validate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        """The training loss (eps-prediction or L2) on the validation split, without augmentation."""
        losses = [accelerator.gather_for_metrics(model.per_example_loss(self.pair(batch["x"], train=False)))
                  for batch in loader]
        return {"val_loss": torch.cat(losses).double().mean().item()}

    def held_out_pairs(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_samples` held-out images X and their low-resolution inputs Y."""
        validation = self.pixel_data.validation
        high_res = torch.stack([validation[i]["x"] for i in range(min(num_samples, len(validation)))])
        return high_res, downsample(high_res, self.config.model.scale, self.config.model.blur_sigma)

    def super_resolve(self, model, low_res: torch.Tensor) -> torch.Tensor:
        cfg = self.config.model
        network = model.network
        vae = load_vae(self.vae_dir, network.device) if self.vae_dir is not None else None
        scheduler = None if cfg.objective == "regression" else make_sampler(cfg.sampler, model.scheduler.config)
        outputs = [super_resolve(network, scheduler, chunk.to(network.device), cfg.scale, cfg.objective, vae,
                                 cfg.num_inference_steps, residual=cfg.residual, residual_scale=cfg.residual_scale)
                   for chunk in low_res.split(256)]
        return torch.cat(outputs)

    def generate(self, model, num_samples: int) -> torch.Tensor:
        """Super-resolved held-out images (their low-resolution versions in, the first `num_samples`)."""
        return self.super_resolve(model, self.held_out_pairs(num_samples)[1])

    def sample_metrics(self, samples: torch.Tensor) -> dict[str, float]:
        """PSNR and SSIM of the outputs against their ground truth, consistency with their inputs."""
        high_res, low_res = self.held_out_pairs(len(samples))
        cfg = self.config.model
        return super_resolution_metrics(samples.cpu(), high_res, low_res, cfg.scale, cfg.blur_sigma)

    @torch.no_grad()
    def preview(self, model, batch: torch.Tensor) -> torch.Tensor:
        """Rows of 8: the input (nearest-upsampled), the output, the ground truth."""
        high_res, low_res = self.held_out_pairs(8)
        shown = torch.nn.functional.interpolate(low_res, size=high_res.shape[-2:], mode="nearest")
        return torch.cat([shown, self.super_resolve(model, low_res).cpu(), high_res])

    def export(self, model, stage_dir: Path) -> None:
        cfg = self.config.model
        vae = fold_scaling_factor(load_vae(self.vae_dir, "cpu")) if self.vae_dir is not None else None
        scheduler = cfg.make_train_scheduler() if cfg.objective == "regression" else model.scheduler
        SuperResolutionPipeline(model.network, scheduler, vae, cfg.scale, cfg.objective,
                                cfg.residual, cfg.residual_scale).save_pretrained(stage_dir)
        write_space(stage_dir, self.kind, self.data.kind)

    @classmethod
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        raise ValueError(f"{stage_dir} is a super-resolution model: it turns low-resolution images into "
                         f"high-resolution ones; run `stagediff super-resolve INPUTS --model {stage_dir}`")

    @classmethod
    def passes_per_sample(cls, block: dict) -> str:
        cfg = cls.model_config(**(block.get("model") or {}))
        return "1" if cfg.objective == "regression" else cfg.passes_per_sample()

    @classmethod
    def card_usage(cls, repo_id: str, space: str) -> str:
        return f"Or, with stagediff installed: `stagediff super-resolve INPUTS --model {repo_id} --out DIR`."
