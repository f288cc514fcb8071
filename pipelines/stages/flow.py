"""The normalizing flow (seed part III) as a stage: on pixels, 2D vectors or VAE latents.

Trained by maximum likelihood (-ln p(x) = 1/2 ||h(x)||^2 - ln |det J_h(x)| + cst) with the seed's
early stopping on the validation split (`training.eval_every`, `training.early_stopping_patience`;
the best weights are exported). Exports `flow/` (a `NormalizingFlow`, safetensors) and, on latents,
a copy of the VAE in `vae/`.

`class_conditional: true` (labelled data, K classes from the data) learns the exact p(x | c) with a
learned base mean per class (`NormalizingFlow`), trained on -ln p(x | c). Its Bayes classifier
argmax_c ln p(x | c) + ln p(c), p(c) the training split's class frequencies (saved with the flow),
is a generative classifier: `bayes_accuracy` on the held-out split. Samples take class labels
(balanced by default); a flow has no null-class model, so no classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset, Subset

from ...modules.flows import FlowNLLLoss, NormalizingFlow
from ...modules.likelihood import bits_per_dim, dequantize
from ..diffusion import class_labels_for
from .base import Likelihood, require_positive
from .spaces import DataSpaceStage, check_class_conditional, to_data_space

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
    # p(x | class) of labelled data (K classes from the data): a learned base mean per class.
    class_conditional: bool = False

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
        check_class_conditional(config, data)
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
                               spline_bound=cfg.spline_bound,
                               num_classes=self.data.num_classes if cfg.class_conditional else None)
        if cfg.class_conditional:  # p(c) of the Bayes classifier: the training split's class frequencies
            labels = dataset_labels(self.data.train)
            counts = torch.bincount(labels[labels >= 0], minlength=self.data.num_classes).double()
            flow.class_log_prior.copy_((counts / counts.sum()).log())
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

    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class-conditional: the labels (an unlabelled item, -1, trains the marginal p(x))."""
        return {"class_labels": labels} if self.config.model.class_conditional else {}

    def trained_classes(self, model: FlowNLLLoss) -> int | None:
        return model.flow.config.num_classes

    @torch.no_grad()
    def validate(self, model: FlowNLLLoss, loader, accelerator: Accelerator) -> dict[str, float]:
        """Exact validation NLL (nats per example; bits/dim on pixels). Class-conditional, from one
        pass of h per batch: val_nll_nats is -ln p(x | c) with the true labels, val_marginal_* the
        marginal -ln p(x) (comparable with an unconditional flow's), and `bayes_accuracy` the
        Bayes classifier's accuracy on the labelled items."""
        if not self.config.model.class_conditional:
            nll = torch.cat([accelerator.gather_for_metrics(model.flow.nll(self.held_out_input(batch["x"])))
                             for batch in loader]).double().mean().item()
            return self.nll_metrics(nll, model.flow.num_dims)
        per_batch = []
        for batch in loader:
            flow, labels = model.flow, batch["label"]
            log_likelihoods = flow.class_log_likelihoods(self.held_out_input(batch["x"]))  # (B, K) ln p(x | c)
            per_batch.append(accelerator.gather_for_metrics((
                -flow.log_prob_given(log_likelihoods, labels), -flow.log_prob_given(log_likelihoods), labels,
                flow.bayes_classify(log_likelihoods))))
        nll, marginal_nll, labels, predicted = (torch.cat(parts) for parts in zip(*per_batch))
        labelled = labels >= 0
        return {**self.nll_metrics(nll.double().mean().item(), model.flow.num_dims),
                **self.nll_metrics(marginal_nll.double().mean().item(), model.flow.num_dims, "val_marginal_"),
                "bayes_accuracy": (predicted[labelled] == labels[labelled]).double().mean().item()}

    def nll_metrics(self, nll: float, num_dims: int, prefix: str = "val_") -> dict[str, float]:
        """{prefix}nll_nats, and on pixels {prefix}bits_per_dim."""
        metrics = {f"{prefix}nll_nats": nll}
        if self.data.kind == "image":
            metrics[f"{prefix}bits_per_dim"] = bits_per_dim(nll, num_dims)
        return metrics

    def generate(self, model: FlowNLLLoss, num_samples: int,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Samples at the configured temperature, in data space; a class-conditional flow draws
        `class_labels` (default: balanced, sample i of class i mod K)."""
        temperature = self.config.model.temperature
        labels = class_labels_for(model.flow.config.num_classes, num_samples, class_labels,
                                  device=model.flow.device)
        chunks = [slice(start, min(start + 256, num_samples)) for start in range(0, num_samples, 256)]
        samples = torch.cat([model.flow.sample(chunk.stop - chunk.start, temperature,
                                               class_labels=None if labels is None else labels[chunk])
                             for chunk in chunks])
        return self.to_data_space(samples)

    def export(self, model: FlowNLLLoss, stage_dir: Path) -> None:
        model.flow.save_pretrained(stage_dir / "flow")
        self.write_space(stage_dir)

    @classmethod
    @torch.no_grad()
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None, class_labels: torch.Tensor | None = None,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """x = h^{-1}(z), z ~ N(0, I); class-conditional: z ~ N(mu_c, I) for `class_labels` c (an
        int or one per sample; default balanced, sample i of class i mod K)."""
        if guidance_scale != 1:
            raise ValueError(f"guidance_scale={guidance_scale!r} (stagediff sample --guidance-scale): a flow samples "
                             "its exact p(x | c) and has no unconditional (null-class) model to guide with; use 1")
        flow = NormalizingFlow.from_pretrained(stage_dir / "flow").to(device).eval()
        labels = class_labels_for(flow.config.num_classes, num_samples, class_labels, device=device)
        return to_data_space(flow.sample(num_samples, 1.0, generator, class_labels=labels), cls.space(stage_dir),
                             stage_dir / "vae")

    @classmethod
    def num_classes(cls, stage_dir: Path) -> int | None:
        return NormalizingFlow.load_config(stage_dir / "flow").get("num_classes")

    @classmethod
    def likelihood(cls, metrics: dict, space: str) -> Likelihood:
        # Class-conditional: its marginal ln p(x) = ln sum_c p(c) p(x | c), what other families give.
        prefix, name = ("val_marginal_", "marginal") if "val_marginal_nll_nats" in metrics else ("val_", "")
        if f"{prefix}bits_per_dim" in metrics:
            return Likelihood("exact", metrics[f"{prefix}bits_per_dim"], "bits/dim", name)
        unit = "nats per latent" if space == "latent" else "nats per vector"
        return Likelihood("exact", metrics.get(f"{prefix}nll_nats"), unit, name)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The (N,) labels of a split (-1: unlabelled), read from its label tensor where it has one."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    return labels if isinstance(labels, torch.Tensor) else torch.stack([item["label"] for item in dataset])
