"""`stagediff benchmark`'s data section (issue 17): what the sharded latent cache
(pipelines/latents.py) costs a training process, and how its encoding scales with processes.

1. **Memory and start-up**, per cache size (default 10k, 100k and 1M latents of the config's
   latent shape, 4x8x8 for the demo; random, written as shards directly, no VAE): a fresh spawned
   process opens the cache (with its full check), builds the config's latent DDPM and trains it with
   the trainer's kind of loader (shuffled, seeded, prepared by Accelerate). Measured: the process's
   peak resident set (its whole life: imports, model, the sampler's permutation, the data), the
   seconds from opening the cache to the end of the first optimizer step, and the training
   images/s (median of timed windows). Each size is measured twice: reading the shards, and with
   every latent read into one in-memory tensor first (`InMemoryDataset`, what cache layout 1 did).
2. **Encoding**: the real `cached_latents` on random images of the config's shape, with the
   config's VAE (or a fresh one of its shape: the speed does not depend on the weights), in four
   equal shards: one process with one thread, one process with two, and two gloo processes of one
   thread each (`accelerate launch`, configs/accelerate/cpu_two_processes.yaml). Each process times
   its own `cached_latents` call (process start-up and imports are not counted); the one- and
   two-process caches are compared byte for byte. Before each round, the cores other work leaves
   free are measured (`free_cores_now`): on a shared machine they decide what two processes can gain.

3. **Image folders** (default 10k and 100k random PNGs of the data's shape in ten class folders,
   written first): a fresh spawned process reads the folder (`source: imagefolder`), builds the
   config's UNet on pixels and trains it: peak resident set, seconds from reading the folder to the
   end of the first optimizer step, and of that, the seconds `load_data` took (a pass over every
   image would grow with the folder; listing it is all that should).

Every measurement is the best of `--rounds` rounds (default 2), the layouts and the encode runs
alternating, as the training loops' are: a round disturbed by other work on the machine does not
decide. The ratios the targets name come from the same run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration
from PIL import Image
from torch.utils.data import DataLoader

from stagediff.pipelines.config import StageConfig
from stagediff.pipelines.data import DataConfig, DataSplits, InMemoryDataset, load_data
from stagediff.pipelines.latents import MANIFEST, SHARD_ITEMS, LatentShards, Shard, build_cache, cached_latents
from stagediff.pipelines.stages.ddpm import DDPMStage

from .loops import Timing, summary
from .session import best_round
from .system import measure_loader

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_FOLDER_SIZES = (10_000, 100_000)
DEFAULT_ENCODE_ITEMS = 4 * SHARD_ITEMS  # four shards: an even share for one, two or four processes
VALIDATION_ITEMS = 1024
REPO = Path(__file__).resolve().parents[1]
TWO_CPU_PROCESSES = REPO / "configs" / "accelerate" / "cpu_two_processes.yaml"
# (processes, torch threads per process) of the encode runs; the first is the reference.
ENCODE_RUNS = ((1, 1), (1, 2), (2, 1))


def measure_data(stage_cfg: StageConfig, latent_shape: tuple[int, int, int], image_shape: tuple[int, int, int],
                 vae_stage_dir: Path, work_dir: Path, *, sizes=DEFAULT_SIZES, batch_size: int, timing: Timing,
                 threads: int, cpu: bool, folder_sizes=DEFAULT_FOLDER_SIZES, encode_items: int = DEFAULT_ENCODE_ITEMS,
                 encode_runs=ENCODE_RUNS, rounds: int = 1, seed: int = 0) -> dict:
    """The data section's measurements and targets (module docstring). `stage_cfg`: the latent
    ddpm stage whose model trains; `latent_shape`: its (C, H, W); `image_shape`: the data's. Each
    measurement is the best of `rounds` (the layouts, and the encode runs, alternate)."""
    out = {"latent_shape": list(latent_shape), "shard_items": SHARD_ITEMS, "batch_size": batch_size,
           "steps_per_window": timing.steps, "threads": threads, "sizes": {}}
    for size in sizes:
        folder = work_dir / f"latents-{size}"
        write_synthetic_cache(folder, size, latent_shape, seed)
        measured = {"shards": [], "in_memory": []}
        for _ in range(rounds):
            for layout, results in measured.items():
                results.append(in_fresh_process(probe, folder, layout, stage_cfg, batch_size, timing, threads, cpu,
                                                seed))
        out["sizes"][str(size)] = {layout: best_round(results) for layout, results in measured.items()}
        shutil.rmtree(folder)
    out["image_folders"] = {}
    for size in folder_sizes:
        folder = work_dir / f"images-{size}"
        write_image_folder(folder, size, image_shape, seed)
        out["image_folders"][str(size)] = min(
            (in_fresh_process(probe_image_folder, folder, image_shape, stage_cfg, batch_size, threads, cpu, seed)
             for _ in range(rounds)), key=lambda r: r["time_to_first_step_s"])
        shutil.rmtree(folder)
    out["encode"] = measure_encode(vae_stage_dir, image_shape, encode_items, encode_runs, work_dir / "encode", seed,
                                   rounds)
    out["targets"] = data_targets(out)
    return out


def write_synthetic_cache(folder: Path, size: int, shape: tuple[int, int, int], seed: int) -> None:
    """`size` train and VALIDATION_ITEMS validation latents ~ N(0, I), labels 0..9, as a sharded cache."""
    def synthetic(shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + 7919 * shard.index + (shard.split == "validation"))
        count = shard.stop - shard.start
        return torch.randn((count, *shape), generator=generator), torch.arange(shard.start, shard.stop) % 10

    build_cache(folder, _synthetic_info(size), {"train": size, "validation": VALIDATION_ITEMS}, synthetic,
                PartialState(cpu=True))


def _synthetic_info(size: int) -> dict[str, str]:
    return {"key": f"synthetic-{size}", "data": f"{size} random latents"}


def probe(folder: Path, layout: str, stage_cfg: StageConfig, batch_size: int, timing: Timing, threads: int,
          cpu: bool, seed: int) -> dict:
    """In this (fresh) process: open the cache in `folder` ("shards", or "in_memory": every latent
    read into one tensor), train the stage's model on it; peak RSS, time to the first step, images/s."""
    torch.set_num_threads(threads)
    accelerator = Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                 data_seed=seed))
    torch.set_num_threads(threads)  # Accelerate may set its own on CPUs
    rss_before = _peak_rss_mib()
    started = time.perf_counter()
    manifest = json.loads((folder / MANIFEST).read_text())
    counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
    manifest = build_cache(folder, _synthetic_info(counts["train"]), counts, _never_encode, accelerator)  # checks
    train = LatentShards(folder, manifest, "train")
    if layout == "in_memory":
        train = InMemoryDataset(train.samples, train.labels)
    data = DataSplits(train=train, validation=train, sample_shape=tuple(manifest["splits"]["train"]["shape"]),
                      kind="latent", num_classes=10, description="synthetic latents", config=DataConfig())
    torch.manual_seed(seed)
    model = DDPMStage(stage_cfg, data).build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cpu else {"foreach": True}))
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=stage_cfg.training.num_workers, generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches = _endless(loader)

    def step():
        loss = model(next(batches)["x"])["loss"]
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step().item()  # .item(): the step has finished on any device
    first_step_s = time.perf_counter() - started
    windows = []
    for _ in range(timing.windows):
        window_started = time.perf_counter()
        for _ in range(timing.steps):
            loss = step()
        loss.item()
        windows.append(timing.steps * batch_size / (time.perf_counter() - window_started))
    peak_rss = _peak_rss_mib()
    batches.close()
    loader_alone = measure_loader(accelerator, train, batch_size, stage_cfg.training.num_workers, None)
    return {"items": len(train), "peak_rss_mib": peak_rss, "rss_before_opening_mib": rss_before,
            "time_to_first_step_s": first_step_s, **summary(windows, timing, batch_size, "fp32"),
            "loader_images_per_s": loader_alone["loader_images_per_s"]}


def write_image_folder(folder: Path, size: int, shape: tuple[int, int, int], seed: int) -> None:
    """`size` PNGs of uniform random pixels of `shape` (C, H, W), in ten class folders."""
    channels, height, width = shape
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    rng = np.random.default_rng(seed)
    for label in range(10):
        (folder / f"class_{label}").mkdir(parents=True)
    for index in range(size):
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(
            folder / f"class_{index % 10}" / f"{index:07d}.png")


def probe_image_folder(folder: Path, image_shape: tuple[int, int, int], stage_cfg: StageConfig, batch_size: int,
                       threads: int, cpu: bool, seed: int) -> dict:
    """In this (fresh) process: read the image folder as training does, train the stage's UNet on its
    pixels for one step; peak RSS, time to the first step and, of it, the data loading's."""
    torch.set_num_threads(threads)
    accelerator = Accelerator(cpu=cpu)
    torch.set_num_threads(threads)  # Accelerate may set its own on CPUs
    channels, resolution, _ = image_shape
    started = time.perf_counter()
    data = load_data(DataConfig(source="imagefolder", train_data_dir=str(folder), resolution=resolution,
                                channels=channels))
    load_data_s = time.perf_counter() - started
    torch.manual_seed(seed)
    model = DDPMStage(stage_cfg, data).build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=stage_cfg.training.num_workers, generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.backward(model(next(iter(loader))["x"])["loss"])
    optimizer.step()
    first_step_s = time.perf_counter() - started
    return {"items": len(data.train) + len(data.validation), "peak_rss_mib": _peak_rss_mib(),
            "load_data_s": load_data_s, "time_to_first_step_s": first_step_s}


def _never_encode(shard: Shard):
    raise RuntimeError(f"the synthetic cache lacks {shard.name}: it was written before the probe")


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _peak_rss_mib() -> float:
    """This process's peak resident set so far: Linux's VmHWM (getrusage's ru_maxrss is kept across
    exec, so a spawned process would report its parent's peak when that was higher)."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux
        scale = 2 ** 20 if sys.platform == "darwin" else 2 ** 10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def in_fresh_process(function, *args):
    """`function(*args)` in a new spawned process (honest peak memory, a clean Accelerate state)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ----------------------------------------------------------------------------- encoding


def measure_encode(vae_stage_dir: Path, image_shape: tuple[int, int, int], items: int, runs, work_dir: Path,
                   seed: int, rounds: int = 1) -> dict:
    """Images/s of `cached_latents` per (processes, threads) in `runs` (the first is the reference),
    each the best of `rounds` rounds (a round disturbed by other work on the machine does not decide);
    every run's cache compared byte for byte with the reference's first."""
    if items % 4:
        raise ValueError(f"--encode-items {items}: a multiple of 4 is needed (four equal shards)")
    names = {run: f"{run[0]}_process{'es' if run[0] > 1 else ''}_{run[1]}_thread{'s' if run[1] > 1 else ''}"
             for run in runs}
    measured = {name: [] for name in names.values()}
    free_cores = []
    for round_index in range(rounds):  # alternate: every run once, then again
        free_cores.append(free_cores_now())
        for (processes, threads), name in names.items():
            spec = {"vae": str(vae_stage_dir / "vae"), "cache": str(work_dir / f"{name}-{round_index}"),
                    "image_shape": list(image_shape), "items": items, "threads": threads, "seed": seed,
                    "result": str(work_dir / f"{name}-{round_index}.json")}
            measured[name].append({**launch_encode(spec, processes), "processes": processes, "threads": threads})
    reference_name = names[runs[0]]
    reference_files = _files(Path(measured[reference_name][0]["cache"]))
    results = {}
    for name, rounds_measured in measured.items():
        same = all(_files(Path(r.pop("cache"))) == reference_files for r in rounds_measured)
        results[name] = best_round(rounds_measured)
        if name != reference_name:
            results[name]["same_bytes_as_reference"] = same
    for name, result in results.items():
        result["speedup"] = result["images_per_s"] / results[reference_name]["images_per_s"]
    shutil.rmtree(work_dir)
    return {"reference": reference_name, "shard_items": items // 4, "runs": results,
            "free_cores_before_each_round": free_cores}


def free_cores_now(seconds: float = 2.0) -> float:
    """The cores other work leaves free, as the rate of two single-thread matmul loops run side by
    side over one loop's rate (2.0: two free cores; 1.0: one, the other busy with other work)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_matmul_rate, [0.1, 0.1]))  # both workers started and warm
        alone = pool.submit(_matmul_rate, seconds).result()
        return sum(pool.map(_matmul_rate, [seconds, seconds])) / alone


def _matmul_rate(seconds: float) -> float:
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        a @ a
        count += 1
    return count / seconds


def launch_encode(spec: dict, processes: int) -> dict:
    """`encode_worker` in `processes` new processes (two or more: gloo, through accelerate launch)."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "stagediff.benchmarks.data", str(spec_path)]
    if processes > 1:
        command = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", str(TWO_CPU_PROCESSES),
                   "--num_processes", str(processes), "--main_process_port", "0", "-m", "stagediff.benchmarks.data",
                   str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return {**json.loads(Path(spec["result"]).read_text()), "cache": spec["cache"]}


def encode_worker(spec: dict) -> None:
    """One process of an encode run: `cached_latents` of random images into `spec["cache"]`, timed."""
    torch.set_num_threads(spec["threads"])
    accelerator = Accelerator(cpu=True)
    torch.set_num_threads(spec["threads"])
    generator = torch.Generator().manual_seed(spec["seed"])  # the same images in every process
    shard = spec["items"] // 4

    def images(count: int) -> InMemoryDataset:
        pixels = torch.randint(0, 256, (count, *spec["image_shape"]), dtype=torch.uint8, generator=generator)
        return InMemoryDataset(pixels, torch.arange(count) % 10)

    channels, resolution, _ = spec["image_shape"]
    data = DataSplits(train=images(3 * shard), validation=images(shard), sample_shape=tuple(spec["image_shape"]),
                      kind="image", num_classes=10, description=f"{spec['items']} random images",
                      config=DataConfig(resolution=resolution, channels=channels))
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    cached_latents(Path(spec["vae"]), data, "mean", Path(spec["cache"]), accelerator, shard_size=shard)
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        Path(spec["result"]).write_text(json.dumps({"images": spec["items"], "seconds": seconds,
                                                    "images_per_s": spec["items"] / seconds}))


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


# ----------------------------------------------------------------------------- targets and table


def data_targets(out: dict) -> list[dict]:
    """Issue 17's targets for the latent cache, each with the measured value and whether it is met."""
    targets = []

    def add(name, measured, goal, met):
        targets.append({"target": name, "measured": measured, "goal": goal, "met": bool(met)})

    sizes = out["sizes"]
    smallest, largest = min(sizes, key=int), max(sizes, key=int)
    if smallest != largest:
        growth = sizes[largest]["shards"]["peak_rss_mib"] / sizes[smallest]["shards"]["peak_rss_mib"] - 1
        add(f"peak RSS per process, {int(largest):,} vs {int(smallest):,} cached latents (shards)", growth,
            "< 0.10", growth < 0.10)
    for size, layouts in sizes.items():
        ratio = layouts["shards"]["images_per_s"] / layouts["in_memory"]["images_per_s"]
        add(f"training images/s from shards vs in memory, {int(size):,} latents", ratio, ">= 0.95", ratio >= 0.95)
    folders = out["image_folders"]
    if len(folders) > 1:
        smallest, largest = min(folders, key=int), max(folders, key=int)
        growth = folders[largest]["time_to_first_step_s"] / folders[smallest]["time_to_first_step_s"] - 1
        add(f"time to the first step, image folder of {int(largest):,} vs {int(smallest):,} images", growth,
            "< 0.10", growth < 0.10)
    two = [r for r in out["encode"]["runs"].values() if r["processes"] == 2 and r["threads"] == 1]
    if two:
        add("encode images/s, 2 processes vs 1 (one thread each, 2 cores)", two[0]["speedup"], ">= 1.7x",
            two[0]["speedup"] >= 1.7)
        add("2-process cache equals the 1-process cache byte for byte", float(two[0]["same_bytes_as_reference"]),
            "1 (yes)", two[0]["same_bytes_as_reference"])
    return targets


def format_data(out: dict) -> str:
    lines = [f"latent cache (data section): {'x'.join(map(str, out['latent_shape']))} latents, "
             f"{out['shard_items']} per shard, batch {out['batch_size']}, {out['threads']} torch thread(s)", "",
             "| cached latents | layout | peak RSS, MiB | time to first step, s | training images/s | "
             "loader alone, images/s |", "|---|---|---|---|---|---|"]
    for size, layouts in out["sizes"].items():
        for layout, r in layouts.items():
            lines.append(f"| {int(size):,} | {layout.replace('_', ' ')} | {r['peak_rss_mib']:.0f} | "
                         f"{r['time_to_first_step_s']:.2f} | {r['images_per_s']:.0f} | "
                         f"{r['loader_images_per_s']:.0f} |")
    lines += ["", "| image folder (PNGs) | peak RSS, MiB | time to first step, s | of which load_data, s |",
              "|---|---|---|---|"]
    for size, r in out["image_folders"].items():
        lines.append(f"| {int(size):,} | {r['peak_rss_mib']:.0f} | {r['time_to_first_step_s']:.2f} | "
                     f"{r['load_data_s']:.2f} |")
    encode = out["encode"]
    free = ", ".join(f"{cores:.2f}" for cores in encode["free_cores_before_each_round"])
    lines += ["", f"free cores before each encode round (two single-thread matmul loops side by side over "
                  f"one): {free}",
              "", f"| encode ({encode['shard_items'] * 4:,} images, 4 shards) | images/s | speed-up | same bytes |",
              "|---|---|---|---|"]
    for name, r in encode["runs"].items():
        same = "" if name == encode["reference"] else "yes" if r["same_bytes_as_reference"] else "NO"
        lines.append(f"| {r['processes']} process(es) x {r['threads']} thread(s) | {r['images_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {same} |")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in out["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']:.3g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one process of an encode run (launch_encode)
    encode_worker(json.loads(Path(sys.argv[1]).read_text()))
