"""The normalizing flow (seed part III) as a stage: on pixels, 2D vectors or VAE latents.

Trained by maximum likelihood (-ln p(x) = 1/2 ||h(x)||^2 - ln |det J_h(x)| + cst) with the seed's
early stopping on the validation split (`training.eval_every`, `training.early_stopping_patience`;
the best weights are exported). Exports `flow/` (a `NormalizingFlow`, safetensors) and, on latents,
a copy of the VAE in `vae/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from ...modules.flows import FlowNLLLoss, NormalizingFlow
from ...modules.likelihood import bits_per_dim, dequantize
from .base import Likelihood, require_positive
from .spaces import DataSpaceStage, to_data_space

ACTNORM_INIT_EXAMPLES = 256


@dataclass
class FlowModelConfig:
    """The `model:` block of a `kind: flow` stage (see `NormalizingFlow` for the architecture)."""

    num_scales: int = 2
    steps_per_scale: int = 4
    hidden_channels: int = 64
    num_blocks: int = 2
    scale_bound: float = 2.0
    coupling_mask: Literal["channel", "checkerboard"] = "channel"
    # Vectors: the seed's affine coupling, or a rational-quadratic spline (Durkan et al. 2019).
    coupling: Literal["affine", "spline"] = "affine"
    num_bins: int = 8
    spline_bound: float = 4.0
    latents: Literal["mean", "sample"] = "mean"
    temperature: float = 1.0  # sampling temperature for previews and evaluation
    num_eval_samples: int = 1000

    def __post_init__(self):
        require_positive(self, "num_scales", "steps_per_scale", "hidden_channels", "num_blocks", "num_eval_samples",
                         "num_bins")
        if self.scale_bound <= 0:
            raise ValueError(f"scale_bound: {self.scale_bound!r} is not valid; expected a number > 0")
        if self.temperature < 0:
            raise ValueError(f"temperature: {self.temperature!r} is not valid; expected a number >= 0")


class FlowStage(DataSpaceStage):
    kind = "flow"
    model_config = FlowModelConfig
    monitor = "val_nll_nats"
    description = "a normalizing flow (RealNVP/Glow couplings) trained by exact maximum likelihood"
    hub_tag = "normalizing-flow"
    exported_classes = (NormalizingFlow,)
    course_name = "normalizing flow"
    course_part = 3
    course_verdicts = {
        "efficient sampling": "+",
        "ln p(x) of a datum": "+ exact",
        "maximum-likelihood training": "+ yes, early stopping on validation NLL",
        "architecture": "− invertible layers, tractable log-det",
        "size of Z": "− equal to X",
        "what else the course says": "− the base distribution's shape is strongly constrained",
    }

    def __init__(self, config, data, input_dir: Path | None = None):
        super().__init__(config, data, input_dir)
        if data.kind == "image" and self.vae_dir is None:
            size, factor = data.sample_shape[1], 2 ** config.model.num_scales
            if size % factor:
                raise ValueError(f"stages.{config.name}.model.num_scales: {config.model.num_scales} scales halve "
                                 f"the resolution {config.model.num_scales} times; {size} is not divisible by {factor}")

    def build_model(self) -> FlowNLLLoss:
        cfg = self.config.model
        flow = NormalizingFlow(sample_shape=list(self.data.sample_shape), num_scales=cfg.num_scales,
                               steps_per_scale=cfg.steps_per_scale, hidden_channels=cfg.hidden_channels,
                               num_blocks=cfg.num_blocks, scale_bound=cfg.scale_bound,
                               coupling_mask=cfg.coupling_mask, coupling=cfg.coupling, num_bins=cfg.num_bins,
                               spline_bound=cfg.spline_bound)
        # ActNorm's data-dependent initialisation, on the same first training examples in every
        # process (so distributed replicas start identical).
        count = min(ACTNORM_INIT_EXAMPLES, len(self.data.train))
        x = torch.stack([self.data.train[i]["x"] for i in range(count)])
        with torch.no_grad():
            flow(self.training_input(x))
        return FlowNLLLoss(flow)

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.data.kind == "image":
            return dequantize(x)  # a density on continuous data bounds the discrete likelihood
        return super().training_input(x)

    def held_out_input(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize(x) if self.data.kind == "image" else super().held_out_input(x)

    @torch.no_grad()
    def validate(self, model: FlowNLLLoss, loader, accelerator: Accelerator) -> dict[str, float]:
        """Exact validation NLL (nats per example; bits/dim on pixels)."""
        nll = torch.cat([accelerator.gather_for_metrics(model.flow.nll(self.held_out_input(batch["x"])))
                         for batch in loader]).double().mean().item()
        metrics = {"val_nll_nats": nll}
        if self.data.kind == "image":
            metrics["val_bits_per_dim"] = bits_per_dim(nll, model.flow.num_dims)
        return metrics

    def generate(self, model: FlowNLLLoss, num_samples: int) -> torch.Tensor:
        temperature = self.config.model.temperature
        samples = torch.cat([model.flow.sample(min(256, num_samples - start), temperature)
                             for start in range(0, num_samples, 256)])
        return self.to_data_space(samples)

    def export(self, model: FlowNLLLoss, stage_dir: Path) -> None:
        model.flow.save_pretrained(stage_dir / "flow")
        self.write_space(stage_dir)

    @classmethod
    @torch.no_grad()
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        flow = NormalizingFlow.from_pretrained(stage_dir / "flow").to(device).eval()
        return to_data_space(flow.sample(num_samples, 1.0, generator), cls.space(stage_dir), stage_dir / "vae")

    @classmethod
    def likelihood(cls, metrics: dict, space: str) -> Likelihood:
        if "val_bits_per_dim" in metrics:
            return Likelihood("exact", metrics["val_bits_per_dim"], "bits/dim")
        unit = "nats per latent" if space == "latent" else "nats per vector"
        return Likelihood("exact", metrics.get("val_nll_nats"), unit)
