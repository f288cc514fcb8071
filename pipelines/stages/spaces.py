"""What every generative family shares: training on pixels, 2D vectors, or (with
`input: <vae stage>`) that VAE's cached latents, and mapping its samples back to data space."""

from __future__ import annotations

import abc
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from ..evaluation import conditional_metrics, generation_metrics
from ..images import scatter_image
from ..latents import cached_latents, check_vae_input, decode_latents, load_vae, sample_posterior
from ..stage_folder import CACHE_DIR, write_space
from .base import Stage


def check_class_conditional(config, data, vectors: str | None = None) -> None:
    """`model.class_conditional: true` needs labelled data: a ValueError naming the key and the data
    otherwise. `vectors`: why the family cannot condition 2-D vectors (None: it can)."""
    if not config.model.class_conditional:
        return
    if vectors is not None and data.kind == "vector":
        what, needed = f"2-D vectors ({vectors})", "images"
    elif data.num_classes is None:
        what, needed = "no class labels", "images" if vectors is not None else "data"
    else:
        return
    raise ValueError(f"stages.{config.name}.model.class_conditional: true needs labelled {needed}, and the data "
                     f"({data.description}) has {what}; use a labelled data.source (mnist, an imagefolder with "
                     "class subfolders, a hub dataset with data.label_column)")


class DataSpaceStage(Stage):
    """A stage whose model lives in the data's space or in an input VAE's latent space.

    `self.pixel_data` keeps the original data (the reference for sample metrics); `self.data`
    becomes the cached latents in `setup` when the stage has an input VAE. The `model:` config
    must have `latents` ("mean" or "sample") and `num_eval_samples` keys. A family supplies
    `generate`; evaluation and previews of samples are shared.
    """

    accepts_input = True

    def __init__(self, config, data, input_dir: Path | None = None):
        super().__init__(config, data, input_dir)
        self.pixel_data = data
        self.vae_dir = check_vae_input(config.name, data, input_dir) if input_dir is not None else None

    def setup(self, accelerator: Accelerator, stage_dir: Path) -> None:
        if self.vae_dir is not None:
            self.data = cached_latents(self.vae_dir, self.data, self.config.model.latents, stage_dir / CACHE_DIR,
                                       accelerator)

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.data.kind == "latent" and self.config.model.latents == "sample":
            return sample_posterior(x)
        return x

    def held_out_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validation data as the model sees it: latents are their posterior means (a
        `latents: sample` cache holds [mean, std] on channels)."""
        return x[:, : self.data.sample_shape[0]] if self.data.kind == "latent" else x

    @abc.abstractmethod
    def generate(self, model: torch.nn.Module, num_samples: int) -> torch.Tensor:
        """`num_samples` samples in data space (see `to_data_space`) from the training module; a
        class-conditional family's also takes `class_labels` (default: balanced classes)."""

    def trained_classes(self, model: torch.nn.Module) -> int | None:
        """K of a class-conditional training module (its samples take labels 0..K-1), else None."""
        return None

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
        """`validate`, then sampling time and `generation_metrics` of `num_eval_samples` samples."""
        metrics = self.validate(model, loader, accelerator)
        if accelerator.is_main_process:
            num_samples = self.config.model.num_eval_samples
            classes = self.trained_classes(model)
            requested = None if classes is None else torch.arange(num_samples) % classes  # balanced
            started = time.perf_counter()
            samples = self.generate(model, num_samples) if requested is None else self.generate(
                model, num_samples, requested)
            metrics["sampling_seconds_per_sample"] = (time.perf_counter() - started) / num_samples
            metrics.update(generation_metrics(samples, self.pixel_data, accelerator.device, self.vae_dir))
            if requested is not None:
                metrics.update(conditional_metrics(samples, requested, self.pixel_data, accelerator.device))
            metrics.update(self.sample_metrics(samples))
        return metrics

    def sample_metrics(self, samples: torch.Tensor) -> dict[str, float]:
        """Family-specific metrics of the `num_eval_samples` evaluation samples (none by default)."""
        return {}

    @torch.no_grad()
    def preview(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """64 samples; class-conditional: one row of 8 samples per class (the first 16 classes)."""
        classes = self.trained_classes(model)
        if classes is not None:
            labels = torch.arange(min(classes, 16)).repeat_interleave(8)
            return self.generate(model, len(labels), labels)
        if self.data.kind == "vector":
            return scatter_image(self.generate(model, 2000))
        return self.generate(model, 64)

    def to_data_space(self, samples: torch.Tensor) -> torch.Tensor:
        return to_data_space(samples, self.data.kind, self.vae_dir)

    def write_space(self, stage_dir: Path) -> None:
        """Record the space (and copy the VAE for latents) so `sample` needs only the folder."""
        if self.vae_dir is not None:
            load_vae(self.vae_dir, "cpu").save_pretrained(stage_dir / "vae")
        write_space(stage_dir, self.kind, self.data.kind)


def to_data_space(samples: torch.Tensor, space: str, vae_dir: Path | None) -> torch.Tensor:
    """Latents -> decoded images; images -> clamped to [-1, 1]; vectors unchanged."""
    if space == "latent":
        return decode_latents(vae_dir, samples)
    return samples.clamp(-1, 1) if space == "image" else samples
