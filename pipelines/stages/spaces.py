"""What every generative family shares: training on pixels, 2D vectors, or (with
`input: <vae stage>`) that VAE's cached latents, and mapping its samples back to data space."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator

from ..latents import cached_latents, check_vae_input, decode_latents, sample_posterior
from .base import Stage
from .vae import load_vae

SPACE_FILE = "stagediff.json"


class DataSpaceStage(Stage):
    """A stage whose model lives in the data's space or in an input VAE's latent space.

    `self.pixel_data` keeps the original data (the reference for sample metrics); `self.data`
    becomes the cached latents in `setup` when the stage has an input VAE. The `model:` config
    must have a `latents` key ("mean" or "sample").
    """

    accepts_input = True

    def __init__(self, config, data, input_dir: Path | None = None):
        super().__init__(config, data, input_dir)
        self.pixel_data = data
        self.vae_dir = check_vae_input(config.name, data, input_dir) if input_dir is not None else None

    def setup(self, accelerator: Accelerator, stage_dir: Path) -> None:
        if self.vae_dir is not None:
            self.data = cached_latents(self.vae_dir, self.data, self.config.model.latents, stage_dir / "cache",
                                       accelerator)

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.data.kind == "latent" and self.config.model.latents == "sample":
            return sample_posterior(x)
        return x

    def to_data_space(self, samples: torch.Tensor) -> torch.Tensor:
        return to_data_space(samples, self.data.kind, self.vae_dir)

    def write_space(self, stage_dir: Path) -> None:
        """Record the space (and copy the VAE for latents) so `sample` needs only the folder."""
        if self.vae_dir is not None:
            load_vae(self.vae_dir, "cpu").save_pretrained(stage_dir / "vae")
        (stage_dir / SPACE_FILE).write_text(json.dumps({"kind": self.kind, "space": self.data.kind}))


def read_space(stage_dir: Path) -> str:
    return json.loads((stage_dir / SPACE_FILE).read_text())["space"]


def to_data_space(samples: torch.Tensor, space: str, vae_dir: Path | None) -> torch.Tensor:
    """Latents -> decoded images; images -> clamped to [-1, 1]; vectors unchanged."""
    if space == "latent":
        return decode_latents(vae_dir, samples)
    return samples.clamp(-1, 1) if space == "image" else samples
