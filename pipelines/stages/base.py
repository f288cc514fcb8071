"""What the one training loop needs from a stage kind, and what the rest of stagediff asks of it
(model cards, reports, sampling and evaluation defaults): everything about a family lives on its
stage class."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn

from ..config import StageConfig
from ..data import DataSplits
from ..stage_folder import read_space


def require_positive(config, *keys: str) -> None:
    """Raise a ValueError naming the first of `keys` whose value in `config` is below 1."""
    for key in keys:
        if getattr(config, key) < 1:
            raise ValueError(f"{key}: {getattr(config, key)!r} is not valid; expected an integer >= 1")


class Likelihood(NamedTuple):
    """A family's answer to "what is ln p(x)?" for a trained stage: `kind` "exact", "bound" or
    "none", and the measured `value` of the quantity `name` in `unit` (None when not evaluated)."""

    kind: Literal["exact", "bound", "none"]
    value: float | None = None
    unit: str = ""
    name: str = ""


class Stage(abc.ABC):
    """A stage kind: builds its training module, evaluates, previews and exports it.

    The training module's `forward(x, **conditioning(labels))` returns named loss terms; `"loss"`
    is the one minimised.
    Everything else (optimizer, precision, distribution, checkpoints) is the trainer's, which
    calls `evaluate`, `preview` and `finalize` with the unwrapped model inside a forked, seeded
    RNG, so they may draw random numbers freely without shifting the training run's stream.

    Args:
        config: the stage's block of the run config (`model` is an instance of `model_config`).
        data: the run's data splits.
        input_dir: the folder of the earlier stage named by `input:` (its outputs are this
            stage's inputs), or None.
    """

    kind: ClassVar[str]
    model_config: ClassVar[type]
    accepts_input: ClassVar[bool] = False  # whether `input:` may name an earlier stage
    monitor: ClassVar[str | None]  # the `validate` metric (lower is better) early stopping watches

    # What the family is, for model cards and reports.
    description: ClassVar[str]  # a phrase: "a DDPM noise predictor trained on the ε-prediction loss"
    hub_tag: ClassVar[str]
    hub_pipeline_tag: ClassVar[str] = "unconditional-image-generation"  # for image data
    # `stagediff evaluate`'s default task: "generation" (samples against the data) or "sr".
    evaluation_task: ClassVar[Literal["generation", "sr"]] = "generation"
    # Our classes (not diffusers') that an exported folder of this kind may hold, for import lines.
    exported_classes: ClassVar[tuple[type, ...]] = ()
    # Component folders that take no part in sampling (a GAN's discriminator only judges).
    auxiliary_components: ClassVar[tuple[str, ...]] = ()
    preview_caption: ClassVar[str] = "samples at the end of training"
    # The course's (seed's) name of the family, the part that teaches it (III to VI), and its
    # verdicts on the properties of its table of advantages (+) and drawbacks (−); None for stages
    # outside the four families.
    course_name: ClassVar[str | None] = None
    course_part: ClassVar[int | None] = None
    course_verdicts: ClassVar[dict[str, str]] = {}
    # The model card: lines that call the exported pipeline after `pipe = ...from_pretrained(...)`.
    card_pipeline_call: ClassVar[tuple[str, ...]] = ()
    card_sample_note: ClassVar[str] = ""  # appended to the card's stagediff sampling snippet

    def __init__(self, config: StageConfig, data: DataSplits, input_dir: Path | None = None):
        if input_dir is not None and not self.accepts_input:
            raise ValueError(f"stages.{config.name}.input: a {self.kind} stage takes no input stage")
        self.config = config
        self.data = data

    def setup(self, accelerator: Accelerator, stage_dir: Path) -> None:
        """Work before training that may replace `self.data` (e.g. caching latents); all processes call it."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh training module; its forward(x) returns {"loss": scalar, other terms...}."""

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups, each with its own optimizer and loss, stepped in this order every
        training step (a GAN: discriminator, then generator). One group: forward(x) is the loss;
        several: forward(x, phase=name) is the loss of group `name`."""
        return {"model": [p for p in model.parameters() if p.requires_grad]}

    @classmethod
    def several_parameter_groups(cls, model_config) -> bool:
        """Whether `parameter_groups` gives several groups for this `model:` block: each phase then
        leaves the other groups' parameters without gradients, which DDP must be told."""
        return False

    def phase_due(self, phase: str, step: int) -> bool:
        """Whether group `phase` steps at (1-based) training step `step` (e.g. a GAN's n_critic)."""
        return True

    def ema_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters that `training.ema_decay` averages for evaluation, sampling and export
        (all by default); the EMA's copy takes the others as they are trained (a GAN's discriminator)."""
        return list(model.parameters())

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the training module sees for a (augmented) data batch, e.g. dequantized pixels."""
        return x

    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training module's keyword arguments besides x, from the batch's (B,) class labels
        (-1: unlabelled): {"class_labels": ...} for a class-conditional stage, none by default."""
        return {}

    @abc.abstractmethod
    def validate(self, model: nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
        """Cheap validation metrics over `loader`, including `monitor` (all processes call this)."""

    def evaluate(self, model: nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
        """The final metrics: `validate`, plus whatever is too costly to compute during training."""
        return self.validate(model, loader, accelerator)

    @abc.abstractmethod
    def preview(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, C, H, W), rows of 8: what a person looks at during training."""

    def finalize(self, model: nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
        """Work after the last step, before export (all processes call this)."""
        return {}

    @abc.abstractmethod
    def export(self, model: nn.Module, stage_dir: Path) -> None:
        """Write the trained networks in diffusers layout (`save_pretrained`, safetensors)."""

    @classmethod
    @abc.abstractmethod
    def sample(cls, stage_dir: Path, num_samples: int, generator: torch.Generator, device: torch.device,
               sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] (or vectors) from an exported stage folder; `sampler` and `steps`
        choose the sampler where the family has several. A class-conditional stage (`num_classes`
        not None) also takes `class_labels` (one per sample) and `guidance_scale`."""

    @classmethod
    def num_classes(cls, stage_dir: Path) -> int | None:
        """K for an exported class-conditional stage (its samples take labels 0..K-1), else None."""
        return None

    # ------------------------------------------------------------------ what reports and cards ask

    @classmethod
    def space(cls, stage_dir: Path) -> str:
        """Where an exported stage's model lives: "image", "vector" or "latent"."""
        return read_space(stage_dir)

    @classmethod
    def likelihood(cls, metrics: dict, space: str) -> Likelihood:
        """ln p(x) as the family gives it, from a finished stage's metrics."""
        return Likelihood("none")

    @classmethod
    def passes_per_sample(cls, block: dict) -> str:
        """Network passes per sample with the stage's configured sampler (its raw config block)."""
        return "1"

    @classmethod
    def hub_tags(cls, space: str) -> list[str]:
        return [cls.hub_tag]

    @classmethod
    def card_pipeline_lines(cls, stage_dir: Path, block: dict) -> tuple[str, ...]:
        """The model card's lines that call the exported pipeline of `stage_dir` (`block`: the
        stage's raw block of the run config)."""
        return cls.card_pipeline_call

    @classmethod
    def card_usage(cls, repo_id: str, space: str) -> str:
        """The model card's second snippet: samples in data space through stagediff."""
        shape = "(16, 2) vectors" if space == "vector" else "(16, C, H, W) images in [-1, 1]"
        lines = ["from pathlib import Path", "", "import torch", "from huggingface_hub import snapshot_download",
                 "from stagediff.pipelines.registry import get_stage_kind", "",
                 f'folder = Path(snapshot_download("{repo_id}"))',
                 f'x = get_stage_kind("{cls.kind}").sample(folder, 16, torch.Generator().manual_seed(0), '
                 'torch.device("cpu"))',
                 f"# x: {shape}{cls.card_sample_note}"]
        return ("Samples in data space (decoded by the VAE for latent stages) with stagediff installed:\n\n"
                "```python\n" + "\n".join(lines) + "\n```")
