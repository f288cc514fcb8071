"""The staged job: one Accelerator, the data once, then each stage in order into its own folder.

Each stage trains into `output_dir/<stage>/` (its contents: stage_folder.py). A stage whose
`done.json` matches its config is skipped (and says so), unless forced. Stage folders that
hold another run (another seed, data or model) stop the job before any work, unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

from .config import ConfigError, RunConfig, non_default_values, save_config
from .data import load_data
from .hub import HubError, push
from .registry import get_stage_kind, parse_run_config
from .stage_folder import (CONFIG_FILE, DONE_FILE, METRICS_FILE, SAMPLES_FILE, done_fingerprint,
                           verify_exported_weights, write_done)
from .stages.base import Stage
from .trainer import train_stage

logger = logging.getLogger(__name__)


def make_accelerator(config: RunConfig) -> Accelerator:
    """Devices, precision, processes and trackers for the whole job, from the run config and
    whatever `accelerate launch` set up (number of processes, distributed backend)."""
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    log_with = config.log_with
    if log_with == "auto":
        log_with = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    output_dir = Path(config.output_dir)
    # A stage with several parameter groups (a GAN) leaves one group unused in each phase.
    several_groups = any(get_stage_kind(s.kind).several_parameter_groups(s.model) for s in config.stages)
    return Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=several_groups)],
        mixed_precision=resolve_mixed_precision(config.mixed_precision, cpu),
        cpu=cpu,
        log_with=None if log_with == "none" else log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    if requested != "auto":
        return requested
    if cpu:
        return "no"  # bf16 autocast: measured from 5-9x slower to no faster than fp32 on CPUs
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# Training keys that leave a stage's weights and metrics as they are (previews and evaluation run
# under a forked RNG): changing them does not make a finished stage train again.
BOOKKEEPING_KEYS = ("resume_from_checkpoint", "log_every", "sample_every", "checkpointing_steps",
                    "checkpoints_total_limit")


def stage_fingerprint(config: RunConfig, stage_name: str) -> str:
    """Hash of everything that determines a stage's outputs: its own block, the data, the seed,
    and the stages before it (their outputs are its inputs). Keys at their default values are left
    out, so a new schema key (with a default that keeps the old behaviour) does not retrain old runs."""
    everything = non_default_values(config)
    upstream = _upstream(everything, stage_name)
    for stage in upstream:  # how far to train is part of the outputs; bookkeeping is not
        for key in BOOKKEEPING_KEYS:
            stage.get("training", {}).pop(key, None)
    relevant = {"seed": everything.get("seed"), "data": everything.get("data"), "stages": upstream,
                "mixed_precision": everything.get("mixed_precision")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _upstream(raw: dict, stage_name: str) -> list[dict]:
    """The raw blocks of `stage_name` and of every stage before it (their outputs are its inputs)."""
    names = [s["name"] for s in raw["stages"]]
    return raw["stages"][: names.index(stage_name) + 1]


def _run_identity(config: RunConfig, stage_name: str) -> dict:
    """What makes a stage folder one run's: the seed, the data, and the kind, input and model of the
    stage and of every stage before it. Training settings (steps, learning rate, checkpointing, ...)
    may change between a run and its continuation."""
    raw = non_default_values(config)  # keys at their defaults are left out, so that a schema key
    return {"seed": config.seed, "data": raw.get("data"),  # added since a run was saved is no difference
            "stages": {s["name"]: {k: v for k, v in s.items() if k not in ("name", "training")}
                       for s in _upstream(raw, stage_name)}}


def _differences(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    """`key is X there, Y here` for every leaf of two nested mappings that differs."""
    found = []
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        there, here = theirs.get(key, "<default>"), ours.get(key, "<default>")
        if isinstance(there, dict) and isinstance(here, dict):
            found += _differences(there, here, f"{prefix}{key}.")
        elif there != here:
            found.append(f"{prefix}{key} is {there!r} there, {here!r} here")
    return found


def other_runs(config: RunConfig) -> dict[Path, str]:
    """The stage folders of `config` in its output_dir that hold another run's files (a different
    seed, data or model, see `_run_identity`), each with what differs. Reruns of the same config,
    which skip or resume, find none."""
    found = {}
    for stage in config.stages:
        folder = Path(config.output_dir) / stage.name
        saved = folder / CONFIG_FILE
        if not saved.is_file():
            if folder.is_dir() and any(folder.iterdir()):
                found[folder] = f"it holds files but no {CONFIG_FILE} of a stagediff run"
            continue
        try:
            theirs = _run_identity(parse_run_config(yaml.safe_load(saved.read_text())), stage.name)
        except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as err:
            found[folder] = f"its {saved.name} is not a stagediff run config ({err!r})"
            continue
        differences = _differences(theirs, _run_identity(config, stage.name))
        if differences:
            found[folder] = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
    return found


def is_stage_done(config: RunConfig, stage_name: str) -> bool:
    return done_fingerprint(Path(config.output_dir) / stage_name) == stage_fingerprint(config, stage_name)


def run(config: RunConfig, force_stages: tuple[str, ...] = (), overwrite: bool = False,
        hub_api=None) -> dict[str, dict[str, float]]:
    """Train every stage of `config` in order; returns each stage's metrics. Stage folders in
    output_dir that hold another run stop it before any work, unless `overwrite` deletes them.
    `hub_api`: the client for `push_to_hub` (default: huggingface_hub's, see `hub.push`)."""
    unknown = set(force_stages) - {s.name for s in config.stages}
    if unknown:
        raise ValueError(f"--force-stage: no stage named {sorted(unknown)}; stages are {[s.name for s in config.stages]}")
    conflicts = other_runs(config)
    if conflicts and not overwrite:
        listing = "".join(f"\n  {folder}: {why}" for folder, why in conflicts.items())
        raise ConfigError(f"output_dir: {config.output_dir} holds another run, which this one would overwrite:"
                          f"{listing}\nChoose another output_dir, or pass --overwrite to delete these folders "
                          "and train their stages anew")
    accelerator = make_accelerator(config)
    if conflicts:
        if accelerator.is_main_process:
            for folder in conflicts:
                shutil.rmtree(folder)
        accelerator.wait_for_everyone()
    accelerator.init_trackers("stagediff")
    with accelerator.main_process_first():
        data = load_data(config.data)
    accelerator.print(f"data: {data.description}")
    accelerator.print(f"accelerate: {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision}")

    results = {}
    for stage_config in config.stages:
        stage_dir = Path(config.output_dir) / stage_config.name
        if stage_config.name not in force_stages and is_stage_done(config, stage_config.name):
            verify_exported_weights(stage_dir)  # its outputs are later stages' inputs
            accelerator.print(f"[{stage_config.name}] outputs in {stage_dir} match the config: skipped "
                              f"(--force-stage {stage_config.name} retrains it)")
            results[stage_config.name] = json.loads((stage_dir / METRICS_FILE).read_text())
            continue
        input_dir = Path(config.output_dir) / stage_config.input if stage_config.input else None
        stage = get_stage_kind(stage_config.kind)(stage_config, data, input_dir)
        if accelerator.is_main_process:
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / DONE_FILE).unlink(missing_ok=True)
            save_config(config, stage_dir / CONFIG_FILE)
        accelerator.wait_for_everyone()
        pushed = config.push_every_checkpoint and stage_config is config.stages[-1]  # the run's pipeline
        _, metrics = train_stage(accelerator, stage, config, stage_dir,
                                 on_checkpoint=checkpoint_pusher(config, stage, stage_dir, hub_api) if pushed else None)
        if accelerator.is_main_process:
            write_done(stage_dir, stage_fingerprint(config, stage_config.name))
        accelerator.print(f"[{stage_config.name}] " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        accelerator.print(f"[{stage_config.name}] weights, metrics and samples in {stage_dir} "
                          f"(look at {stage_dir / SAMPLES_FILE})")
        results[stage_config.name] = metrics
    accelerator.end_training()
    if config.push_to_hub and accelerator.is_main_process:  # the run's final pipeline: its last stage
        push(Path(config.output_dir) / config.stages[-1].name, config.hub_model_id, private=config.hub_private,
             license_id=config.hub_license, api=hub_api)
    return results


def checkpoint_pusher(config: RunConfig, stage: Stage, stage_dir: Path, hub_api=None):
    """`on_checkpoint` for `push_every_checkpoint`: export the weights as they are into a temporary
    stage folder and push it, like diffusers' training examples at each save. A failed push is
    reported and training goes on; the push at the end tries again."""

    def push_snapshot(model: torch.nn.Module, step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="stagediff-snapshot-") as tmp:
            snapshot = Path(tmp) / stage_dir.name  # the card names the stage after its folder
            snapshot.mkdir()
            stage.export(model, snapshot)
            shutil.copyfile(stage_dir / CONFIG_FILE, snapshot / CONFIG_FILE)
            try:
                push(snapshot, config.hub_model_id, private=config.hub_private, license_id=config.hub_license,
                     commit_message=f"{stage_dir.name}: checkpoint at step {step} (stagediff)", api=hub_api)
            except HubError as err:
                logger.warning(f"[{stage_dir.name}] step {step}: {err}; training goes on")

    return push_snapshot
