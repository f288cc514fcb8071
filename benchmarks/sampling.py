"""Sampling cost and quality per sampler on a trained latent DDPM: seconds per image and the
metrics of `stagediff evaluate` (`pipelines.sampling.evaluate_generation`), for DDPM over all T
steps, DDIM 50 and DPM-Solver++ 10 and 20, with the VAE decoder's share of the time; for a
class-conditional model also DPM-Solver++ 20 with classifier-free guidance, against unguided."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from stagediff.pipelines.data import load_data
from stagediff.pipelines.latents import decode_latents
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.sampling import evaluate_generation, pick_device, resolve_stage_dir
from stagediff.pipelines.stage_folder import read_run_config, read_space

SAMPLERS = [("ddpm", None), ("ddim", 50), ("dpmsolver", 10), ("dpmsolver", 20)]  # None: all T steps
GUIDANCE_SCALE = 3.0  # configs/mnist_ldm_cond.yaml's


def measure_samplers(ldm_dir: Path, n: int, seed: int, device: str | None, seeds: int = 1) -> dict:
    """`stagediff evaluate`'s sampling and metrics per sampler, averaged over seeds
    seed..seed+seeds-1 as `evaluate --seeds` does (each seed's FD is kept)."""
    stage_dir, stage_kind = resolve_stage_dir(ldm_dir)
    seed_list = list(range(seed, seed + seeds))
    data = load_data(parse_run_config(read_run_config(stage_dir)).data)  # once for every sampler
    results = []
    for sampler, steps in SAMPLERS:
        evaluation = evaluate_generation(stage_dir, n, seed_list, sampler=sampler, steps=steps, device=device,
                                         data=data)
        mean = evaluation["mean"]
        if "fd" in mean:
            mean["fd_per_seed"] = [r["fd"] for r in evaluation["per_seed"]]
        results.append({"sampler": sampler, "steps": steps, **mean})
    report = {"model_dir": str(stage_dir), "num_samples": n, "seeds": seed_list, "results": results}
    if read_space(stage_dir) == "latent":  # the VAE decoder's share, the same for every sampler
        unet = UNet2DModel.load_config(stage_dir / "unet")
        z = torch.randn(n, unet["in_channels"], unet["sample_size"], unet["sample_size"], device=pick_device(device))
        started = time.perf_counter()
        decode_latents(stage_dir / "vae", z)
        decode = (time.perf_counter() - started) / n
        report["vae_decode_seconds_per_sample"] = decode
        for r in results:
            r["denoising_seconds_per_sample"] = r["sampling_seconds_per_sample"] - decode
    if stage_kind.num_classes(stage_dir) is not None:
        report["guided"] = _guided_vs_unguided(stage_dir, n, seed_list, device, data, results[-1],
                                               report.get("vae_decode_seconds_per_sample", 0.0))
    return report


def _guided_vs_unguided(stage_dir: Path, n: int, seeds: list[int], device: str | None, data,
                        unguided: dict, decode_seconds: float) -> dict:
    """DPM-Solver++ 20 with guidance GUIDANCE_SCALE: its metrics and its denoising time per sample
    over the unguided run's (`unguided`, the same sampler and classes); one network call of batch
    2B per step, so at most ~2x."""
    guided = evaluate_generation(stage_dir, n, seeds, sampler="dpmsolver", steps=20, device=device, data=data,
                                 guidance_scale=GUIDANCE_SCALE)["mean"]
    denoising = guided["sampling_seconds_per_sample"] - decode_seconds
    return {"guidance_scale": GUIDANCE_SCALE, **guided, "denoising_seconds_per_sample": denoising,
            "time_vs_unguided": denoising / (unguided["sampling_seconds_per_sample"] - decode_seconds)}
