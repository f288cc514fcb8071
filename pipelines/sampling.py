"""Samples and scores from an exported stage folder: what `stagediff sample`, `stagediff evaluate`
and the benchmark call. Sampling needs only the folder (see stage_folder.py), never the training
code's state; the defaults of the diffusion samplers are `diffusion.sampler_and_steps`'."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .data import DataSplits, load_data
from .diffusion import class_labels_for, sampler_and_steps
from .evaluation import conditional_metrics, generation_metrics
from .registry import get_stage_kind, parse_run_config
from .stage_folder import finished_stages, read_run_config, stage_block, verify_exported_weights
from .stages.base import Stage


def pick_device(device: str | torch.device | None) -> torch.device:
    """`device` as asked; by default the GPU when there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_stage_dir(path: str | Path) -> tuple[Path, type[Stage]]:
    """(stage folder, its stage class) for a stage folder, or for a run folder its last finished
    stage; the exported weights are first checked against their SHA-256 in done.json."""
    stage_dir = finished_stages(Path(path))[-1]
    verify_exported_weights(stage_dir)
    return stage_dir, get_stage_kind(stage_block(stage_dir)["kind"])


def generate(stage_dir: str | Path, num_samples: int, seed: int, *, sampler: str | None = None,
             steps: int | None = None, batch_size: int = 256, device: str | torch.device | None = None,
             class_label: int | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """`num_samples` samples of a finished stage in data space (images in [-1, 1], or vectors), drawn
    in batches from one generator seeded with `seed`; `sampler` and `steps` as in `sampler_and_steps`.
    A class-conditional stage draws samples of `class_label` (default: balanced classes, sample i
    of class i mod K, `diffusion.class_labels_for`) with classifier-free guidance `guidance_scale`."""
    stage_dir, stage_kind = resolve_stage_dir(stage_dir)
    return _draw(stage_dir, stage_kind, num_samples, seed, sampler, steps, batch_size, pick_device(device),
                 class_label, guidance_scale)


def _draw(stage_dir: Path, stage_kind: type[Stage], num_samples: int, seed: int, sampler: str | None,
          steps: int | None, batch_size: int, device: torch.device, class_label: int | None = None,
          guidance_scale: float = 1.0) -> torch.Tensor:
    """`generate` on a folder already resolved and checked (its weights are hashed once, not per draw)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--n {num_samples} and --batch-size {batch_size}: expected integers >= 1")
    labels = class_labels_for(stage_kind.num_classes(stage_dir), num_samples, class_label, guidance_scale)
    generator = torch.Generator(device).manual_seed(seed)
    batches = []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        classes = {} if labels is None else {"class_labels": labels[start: start + count],
                                             "guidance_scale": guidance_scale}
        batches.append(stage_kind.sample(stage_dir, count, generator, device, sampler=sampler, steps=steps,
                                         **classes).cpu())
    return torch.cat(batches)


def evaluate_generation(stage_dir: str | Path, num_samples: int, seeds: list[int], *, sampler: str | None = None,
                        steps: int | None = None, batch_size: int = 256, device: str | torch.device | None = None,
                        data: DataSplits | None = None, guidance_scale: float = 1.0) -> dict:
    """Sample `num_samples` per seed and score them against the stage's own data
    (`evaluation.generation_metrics`, with the FD of the input VAE's prior for latent stages, as at
    the end of training; class-conditional stages draw balanced classes with `guidance_scale` and
    add `evaluation.conditional_metrics`). Returns {"model_dir", "sampler", "steps", "num_samples",
    "mean", "per_seed"} (and "guidance_scale" for conditional stages): the JSON that `stagediff
    evaluate --out` writes and model cards read. `data`: the stage's data, when the caller has
    loaded it already (default: loaded from the folder's config)."""
    stage_dir, stage_kind = resolve_stage_dir(stage_dir)
    data = data or load_data(parse_run_config(read_run_config(stage_dir)).data)
    vae_dir = stage_dir / "vae" if stage_kind.space(stage_dir) == "latent" else None
    device = pick_device(device)
    # The labels _draw gives a conditional stage by default (balanced), checked here before sampling.
    requested = class_labels_for(stage_kind.num_classes(stage_dir), num_samples, guidance_scale=guidance_scale)
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        samples = _draw(stage_dir, stage_kind, num_samples, seed, sampler, steps, batch_size, device,
                        guidance_scale=guidance_scale)
        seconds = (time.perf_counter() - started) / len(samples)
        conditional = {} if requested is None else conditional_metrics(samples, requested, data, device)
        runs.append({"seed": seed, "sampling_seconds_per_sample": seconds,
                     **generation_metrics(samples, data, device, vae_dir), **conditional})
    mean = {key: statistics.fmean(r[key] for r in runs) for key in runs[0] if key != "seed"}
    sampler, steps = sampler_and_steps(sampler, steps)
    guidance = {} if requested is None else {"guidance_scale": guidance_scale}
    return {"model_dir": str(stage_dir), "sampler": sampler, "steps": steps, "num_samples": num_samples,
            **guidance, "mean": mean, "per_seed": runs}
