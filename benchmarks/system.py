"""The machine and what a run costs it: machine info, peak memory, the data loader's throughput."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader


def machine_info(device: torch.device, threads: int) -> dict:
    import accelerate
    import diffusers

    info = {"device": str(device), "platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak memory while the block runs, in MiB: the GPU's allocated peak on CUDA, else the peak
    resident set size of this process (sampled every 5 ms) and its rise over the start."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        return
    start = _rss_bytes()
    peak, stop = [start], threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes())
        out.update(peak_rss_mib=peak[0] / 2 ** 20, peak_rss_rise_mib=(peak[0] - start) / 2 ** 20)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the lifetime peak
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_loader(accelerator: Accelerator, dataset, batch_size: int, num_workers: int,
                   step_images_per_s: float | None, batches: int = 100) -> dict:
    """Images/s of the trainer's DataLoader alone (same dataset, batch, shuffle, workers, and
    Accelerate's preparation, which puts batches on the device)."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                            num_workers=num_workers, generator=torch.Generator().manual_seed(0)))
    images, started, done = 0, time.perf_counter(), 0
    while done < batches:
        for batch in loader:
            images += len(batch["x"])
            done += 1
            if done >= batches:
                break
    rate = images / (time.perf_counter() - started)
    out = {"loader_images_per_s": rate, "num_workers": num_workers}
    if step_images_per_s:
        out.update(step_images_per_s=step_images_per_s, loader_to_step_ratio=rate / step_images_per_s,
                   loader_share_of_step_time=step_images_per_s / rate)
    return out
