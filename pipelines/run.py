"""The staged job: one Accelerator, the data once, then each stage in order into its own folder.

`output_dir/<stage>/` holds `config.yaml` (the resolved run config), the exported networks
(diffusers layout), `samples.png`, `metrics.json`, `history.jsonl` and `checkpoints/`. A stage
whose `done.json` matches its config is skipped (and says so), unless forced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

from .config import RunConfig, config_to_dict, save_config
from .data import load_data
from .registry import get_stage_kind
from .stages.base import Stage
from .trainer import train_stage

DONE_FILE = "done.json"


def make_accelerator(config: RunConfig) -> Accelerator:
    """Devices, precision, processes and trackers for the whole job, from the run config and
    whatever `accelerate launch` set up (number of processes, distributed backend)."""
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    log_with = config.log_with
    if log_with == "auto":
        log_with = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    output_dir = Path(config.output_dir)
    # A stage with several parameter groups (a GAN) leaves one group unused in each phase.
    several_groups = any(get_stage_kind(s.kind).parameter_groups is not Stage.parameter_groups for s in config.stages)
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
        return "no"  # bf16 autocast measured 5-9x slower than fp32 on CPUs without AMX
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def stage_fingerprint(config: RunConfig, stage_name: str) -> str:
    """Hash of everything that determines a stage's outputs: its own block, the data, the seed,
    and the stages before it (their outputs are its inputs)."""
    everything = config_to_dict(config)
    names = [s.name for s in config.stages]
    upstream = everything["stages"][: names.index(stage_name) + 1]
    for stage in upstream:  # how far to train is part of the outputs; where to resume from is not
        stage["training"].pop("resume_from_checkpoint")
    relevant = {"seed": everything["seed"], "data": everything["data"], "stages": upstream,
                "mixed_precision": everything["mixed_precision"]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def is_stage_done(config: RunConfig, stage_name: str) -> bool:
    done = Path(config.output_dir) / stage_name / DONE_FILE
    return done.is_file() and json.loads(done.read_text()).get("fingerprint") == stage_fingerprint(config, stage_name)


def run(config: RunConfig, force_stages: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Train every stage of `config` in order; returns each stage's metrics."""
    unknown = set(force_stages) - {s.name for s in config.stages}
    if unknown:
        raise ValueError(f"--force-stage: no stage named {sorted(unknown)}; stages are {[s.name for s in config.stages]}")
    accelerator = make_accelerator(config)
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
            accelerator.print(f"[{stage_config.name}] outputs in {stage_dir} match the config: skipped "
                              f"(--force-stage {stage_config.name} retrains it)")
            results[stage_config.name] = json.loads((stage_dir / "metrics.json").read_text())
            continue
        input_dir = Path(config.output_dir) / stage_config.input if stage_config.input else None
        stage = get_stage_kind(stage_config.kind)(stage_config, data, input_dir)
        if accelerator.is_main_process:
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / DONE_FILE).unlink(missing_ok=True)
            save_config(config, stage_dir / "config.yaml")
        accelerator.wait_for_everyone()
        _, metrics = train_stage(accelerator, stage, config, stage_dir)
        if accelerator.is_main_process:
            (stage_dir / DONE_FILE).write_text(json.dumps({"fingerprint": stage_fingerprint(config, stage_config.name)}))
        accelerator.print(f"[{stage_config.name}] " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        accelerator.print(f"[{stage_config.name}] weights, metrics and samples in {stage_dir} "
                          f"(look at {stage_dir / 'samples.png'})")
        results[stage_config.name] = metrics
    accelerator.end_training()
    return results
