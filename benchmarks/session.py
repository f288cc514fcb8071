"""One Accelerate setting, measured in a process of its own.

Accelerate's mixed precision and dynamo backend are process-wide: the first `Accelerator` fixes
them for the process (`AcceleratorState` is shared), and a later one asking for another precision
is refused. So each setting the benchmark compares (a precision; the headline precision compiled)
runs in a fresh spawned process, as a user's `stagediff train` with that `mixed_precision` would,
and reuses that process's one Accelerator for all its runs (the trainer frees the previous run's
objects first, `accelerator.free_memory()`). The parent process makes no Accelerator.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from stagediff.pipelines.config import RunConfig
from stagediff.pipelines.data import load_data
from stagediff.pipelines.stages.ddpm import DDPMStage

from .flops import measure_flops
from .loops import PRECISIONS, Timing, measure_baseline_loop, measure_our_loop, training_run
from .system import measure_loader


@dataclasses.dataclass
class Session:
    """What one process measures: `rounds` of our loop then the baseline (ours alone, compiled,
    with `compile_backend`) on latents; with `headline`, also the pixel-space run (`pixel`), the
    FLOP/s of the step and the data loaders.

    Args:
        config: the run config; `stage_name` names its latent ddpm stage.
        batch_size: of every training run.
        timing: of the latent runs (the pixel run's is `timing.shortened()`).
        precision: fp32, bf16 or fp16 (PRECISIONS).
        cpu: run on the CPU (else Accelerate's default device).
        threads: torch CPU threads.
        vae_stage_dir: the VAE stage folder (holding vae/) that encodes the latents.
        latent_cache: the folder of the latent cache (every session shares it: the first encodes).
        work_dir: where the runs write.
    """

    config: RunConfig
    stage_name: str
    batch_size: int
    timing: Timing
    precision: str
    cpu: bool
    threads: int
    vae_stage_dir: Path
    latent_cache: Path
    work_dir: Path
    rounds: int = 1
    compile_backend: str | None = None
    headline: bool = False
    pixel: bool = False


def in_fresh_process(session: Session) -> dict:
    """`measure(session)` in a new spawned process (a clean Accelerate state), its result returned."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, session).result()


def measure(session: Session) -> dict:
    """{"ours": result, "baseline": result} of the best round (compiled: {"ours": result}), and with
    `session.headline` also "pixel" (with `session.pixel`), "flops" and "data_pipeline"."""
    s = session
    torch.set_num_threads(s.threads)
    accelerator = _accelerator(s)
    stage_cfg = s.config.stage(s.stage_name)
    data = load_data(s.config.data)
    rounds = {"ours": [], "baseline": []}
    for index in range(s.rounds):  # alternate: ours, baseline, ours, ...
        run = training_run(s.config, stage_cfg, s.batch_size, s.timing, s.precision, s.work_dir / f"ours-{index}")
        ours, latent_data = measure_our_loop(accelerator, run, data, s.vae_stage_dir, s.latent_cache, s.precision,
                                             s.timing, s.compile_backend)
        rounds["ours"].append(ours)
        if s.compile_backend is None:
            rounds["baseline"].append(measure_baseline_loop(accelerator, run, data, s.vae_stage_dir, s.precision,
                                                            s.timing))
    if s.compile_backend is not None:  # one round of ours, reported as it ran
        return {"ours": rounds["ours"][0]}
    out = {loop: best_round(results) for loop, results in rounds.items()}
    if not s.headline:
        return out
    if s.pixel:  # same UNet, on the pixels
        timing = s.timing.shortened()
        run = training_run(s.config, stage_cfg, s.batch_size, timing, s.precision, s.work_dir / "pixel",
                           pixel=True)
        out["pixel"], _ = measure_our_loop(accelerator, run, data, None, s.latent_cache, s.precision, timing)
    # The FLOP/s of the step our loop reached, against the matmul peak; where its time goes.
    out["flops"] = measure_flops(DDPMStage(stage_cfg, latent_data), s.batch_size, s.precision, accelerator.device,
                                 out["ours"])
    # The loaders against the step.
    accelerator.free_memory()
    num_workers = stage_cfg.training.num_workers
    out["data_pipeline"] = {
        "latent": measure_loader(accelerator, latent_data.train, s.batch_size, num_workers,
                                 out["ours"]["images_per_s"]),
        "pixel": measure_loader(accelerator, data.train, s.batch_size, num_workers,
                                out.get("pixel", {}).get("images_per_s")),
    }
    return out


def _accelerator(session: Session) -> Accelerator:
    """The process's Accelerator, as `run.make_accelerator` builds it (plus an optional dynamo backend)."""
    accelerator = Accelerator(
        mixed_precision=PRECISIONS[session.precision], cpu=session.cpu,
        dynamo_backend=(session.compile_backend or "no").upper(),
        project_config=ProjectConfiguration(project_dir=str(session.work_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=session.config.seed))
    torch.set_num_threads(session.threads)  # Accelerate may set its own on CPUs
    return accelerator


def best_round(results: list[dict]) -> dict:
    """The round with the highest median (the one least disturbed by other work on the machine),
    with every round's median kept."""
    best = max(results, key=lambda r: r["images_per_s"])
    return {**best, "round_images_per_s": [r["images_per_s"] for r in results]}
