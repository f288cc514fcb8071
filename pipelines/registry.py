"""The one registry of stage kinds. Adding a family is one module plus one line here."""

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
    try:
        return STAGE_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown stage kind {kind!r}; known kinds: {', '.join(STAGE_KINDS)}") from None
