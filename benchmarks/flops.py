"""Achieved FLOP/s of a training step against the matmul peak measured on the same machine, and
where a profiled step's time goes. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`
(a multiply-add counts 2)."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from stagediff.pipelines.stages.ddpm import DDPMStage

from .system import sync


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts the CUDA attention kernels; the CPU one is counted the same way.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}

OP_KINDS = [  # (kind, substrings of profiler op names), first match wins
    ("convolution", ("conv", "cudnn")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "gemm")),
    ("attention", ("attention", "softmax")),
    ("normalization", ("norm",)),
    ("optimizer", ("adam", "foreach")),
]


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """Floating-point operations (a multiply-add counts 2) of `fn()` and of each operator."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, sizes=(1024, 2048),
                repeats: int = 5) -> dict:
    """The best median FLOP/s of square matmuls on this device and thread count."""
    best, per_size = 0.0, {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds = _median_seconds(lambda: a @ b, device, repeats)
        per_size[n] = 2 * n ** 3 / seconds
        best = max(best, per_size[n])
    return {"flop_per_s": best, "per_size": per_size, "dtype": str(dtype).removeprefix("torch.")}


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_flops(stage: DDPMStage, batch_size: int, precision: str, device: torch.device, ours: dict) -> dict:
    """FLOPs of one training step of `stage`'s module (forward + backward), the FLOP/s our loop
    reached with it (`ours`: its measurement), the matmul peak, and where a profiled step spends
    its time."""
    torch.manual_seed(0)
    model = stage.build_model().to(device).train()
    x = torch.stack([stage.data.train[i]["x"] for i in range(batch_size)]).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))

    def step():
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            loss = model(x)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    flops, per_op = count_flops(step)
    peak = matmul_peak(device, dtype or torch.float32, sizes=(1024, 2048) if device.type == "cpu" else (4096, 8192))
    achieved = flops * ours["images_per_s"] / batch_size
    breakdown, dense_seconds, step_seconds = _time_breakdown(step, device)
    dense_flops = sum(v for k, v in per_op.items() if "conv" in k or "mm" in k)
    return {
        "flop_per_step": flops, "flop_per_image": flops / batch_size, "flop_per_op": per_op,
        "achieved_flop_per_s": achieved, "matmul_peak": peak, "fraction_of_peak": achieved / peak["flop_per_s"],
        "profiled_step_seconds": step_seconds, "time_fraction_by_op_kind": breakdown,
        "dense_ops_fraction_of_peak": (dense_flops / dense_seconds / peak["flop_per_s"]) if dense_seconds else None,
        "precision": precision,
    }


def _time_breakdown(step, device: torch.device, steps: int = 3) -> tuple[dict[str, float], float, float]:
    """Share of a step's operator time per OP_KINDS kind (self time, device time on GPUs), the
    seconds per step in convolutions and matmuls, and the profiled seconds per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = (time.perf_counter() - started) / steps
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, keys in OP_KINDS if any(s.lower() in name for s in keys)), "elementwise and other")
        if not name.startswith("aten::") and kind == "elementwise and other":
            continue  # autograd and profiler bookkeeping frames: their children are counted
        totals[kind] = totals.get(kind, 0.0) + getattr(event, attribute, 0.0)
    total = sum(totals.values()) or 1.0
    dense_seconds = (totals.get("convolution", 0.0) + totals.get("matmul", 0.0)) / 1e6 / steps
    return {k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}, dense_seconds, wall
