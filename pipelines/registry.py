"""The one registry of stage kinds. Adding a family is one module plus one line here.

It also binds the config schema (which knows no kind) to the registered kinds: `load_config` and
`parse_run_config` here are the ones to call.
"""

from __future__ import annotations

from pathlib import Path

from . import config
from .config import RunConfig
from .stages.base import Stage
from .stages.ddpm import DDPMStage
from .stages.flow import FlowStage
from .stages.gan import GANStage
from .stages.sr import SRStage
from .stages.vae import VAEStage

STAGE_KINDS: dict[str, type[Stage]] = {
    VAEStage.kind: VAEStage,
    DDPMStage.kind: DDPMStage,
    FlowStage.kind: FlowStage,
    GANStage.kind: GANStage,
    SRStage.kind: SRStage,
}


def get_stage_kind(kind: str) -> type[Stage]:
    return config.lookup_kind(STAGE_KINDS, kind)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, validate it (`config.load_config`)."""
    return config.load_config(path, overrides, STAGE_KINDS)


def parse_run_config(raw: dict) -> RunConfig:
    """Validate a raw run config mapping (`config.parse_run_config`)."""
    return config.parse_run_config(raw, STAGE_KINDS)
