"""What the reliability tests share: tiny configs, runs, snapshots, and killing a real training process."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from stagediff.pipelines.checkpoint import CHECKPOINT_PATTERN
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.run import run

# Planted in the environment of every training run here; it must never reach a file or a log.
FAKE_TOKEN = "hf_FakePlantedToken9f8e7d6c5b4a3210ZZ"
# A 2D toy DDPM small enough for hundreds of steps per second on a laptop CPU. A constant
# learning rate makes the first N steps independent of max_steps, so a run killed on its way to a
# million steps and resumed to N must end exactly where a straight N-step run ends.
TOY_MODEL = {"mlp_hidden": 16, "mlp_layers": 1, "num_train_timesteps": 50, "num_inference_steps": 2,
             "num_eval_samples": 16}
TINY_UNET = {"block_out_channels": [8, 16], "attention": [False, False], "norm_num_groups": 8,
             "num_train_timesteps": 20, "num_inference_steps": 2, "num_eval_samples": 8}


def toy_ddpm_config(output_dir, **training) -> dict:
    return {
        "output_dir": str(output_dir), "seed": 0, "log_with": "none",
        "data": {"source": "toy", "toy": "ring8", "toy_samples": 512},
        "stages": [{"name": "ddpm", "kind": "ddpm", "model": dict(TOY_MODEL),
                    "training": {"max_steps": 8, "batch_size": 32, "learning_rate": 1e-3, "lr_scheduler": "constant",
                                 "ema_decay": 0.9, "log_every": 1, **training}}],
    }


def with_latent_ddpm(raw: dict, **training) -> dict:
    """`raw` (a VAE config) plus a DDPM stage trained on that VAE's cached latents."""
    return {**raw, "stages": [*raw["stages"], {
        "name": "ldm", "kind": "ddpm", "input": "vae", "model": dict(TINY_UNET),
        "training": {"max_steps": 3, "batch_size": 16, "lr_scheduler": "constant", "log_every": 1, **training}}]}


def train(raw: dict, **run_options) -> dict:
    """Run a raw config in this process, as `stagediff train` does."""
    try:
        return run(parse_run_config(raw), **run_options)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def copy_run(raw: dict, output_dir) -> dict:
    """A copy of `raw`'s run in `output_dir`, and its config pointing there."""
    shutil.copytree(raw["output_dir"], output_dir)
    return {**raw, "output_dir": str(output_dir)}


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def exported(output_dir, stage: str = "ddpm") -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / stage / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def step_of(checkpoint: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path: equal snapshots = nothing written."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files_containing(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# --------------------------------------------------------------------------- killing a real process


def start_training(config_path: Path, log_path: Path) -> subprocess.Popen:
    """`python -m stagediff.pipelines.cli train --config ...` (= `stagediff train`), output to a file
    (a pipe nobody reads would block the process once full), on one thread like the tests' own runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN,
           "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "stagediff.pipelines.cli", "train", "--config", str(config_path)]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def kill_when(process: subprocess.Popen, condition, rng: random.Random, log_path: Path, timeout: float = 300) -> None:
    """SIGKILL `process` in a state where `condition()` holds.

    The condition is polled while the process runs (at seeded random intervals); when it holds, the
    process is frozen with SIGSTOP and the condition checked again, so the kill lands in exactly the
    state that was checked (a mid-save folder, say), however the machine schedules the two processes.
    """
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"training exited ({process.returncode}) before the kill point:\n"
                                     f"{log_path.read_text()[-3000:]}")
            if _holds(condition):
                os.kill(process.pid, signal.SIGSTOP)
                _wait_until_stopped(process.pid)
                if _holds(condition):
                    os.kill(process.pid, signal.SIGKILL)
                    assert process.wait() == -signal.SIGKILL
                    return
                os.kill(process.pid, signal.SIGCONT)
            time.sleep(rng.uniform(0, 0.004))
        raise AssertionError(f"the kill point never came within {timeout} s:\n{log_path.read_text()[-3000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _holds(condition) -> bool:
    try:
        return bool(condition())
    except FileNotFoundError:  # a folder renamed or removed while the process runs
        return False


def _wait_until_stopped(pid: int) -> None:
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in "TtZX":  # stopped, or already dead
            return
        time.sleep(0.0005)


def huge_png(width: int, height: int) -> bytes:
    """A few bytes whose header announces a width x height grayscale image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
