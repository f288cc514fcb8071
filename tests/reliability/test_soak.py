"""Fifty train/resume cycles of a tiny model in a row: the disk holds `checkpoints_total_limit`
checkpoints and no more, debris of killed saves is swept, damaged checkpoints are replaced, and no
process, thread or file descriptor is left behind."""

import os
import threading
import warnings
from pathlib import Path

import pytest

from stagediff.pipelines.checkpoint import TMP_PREFIX, list_checkpoints

from .helpers import toy_ddpm_config, train

CYCLES = 50
LIMIT = 2


def disk_use(folder: Path, but: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in but)


def child_processes() -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited while we looked
    return children


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_fifty_train_resume_cycles_leave_no_growth_and_no_leaks(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "ddpm" / "checkpoints"
    sizes, fallbacks = [], 0
    before = child_processes()  # the test process's own, from earlier tests (a pytest-xdist worker's)
    for cycle in range(1, CYCLES + 1):
        if cycle % 10 == 3:  # a kill midway through a save left its folder behind
            (checkpoints / f"{TMP_PREFIX}{10 ** 6}").mkdir()
            (checkpoints / f"{TMP_PREFIX}{10 ** 6}" / "optimizer.bin").write_bytes(b"\0" * 4096)
        if cycle % 10 == 7:  # the newest checkpoint was damaged since
            newest = checkpoints / f"checkpoint-{2 * (cycle - 1)}" / "model.safetensors"
            newest.write_bytes(newest.read_bytes()[:100])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Each cycle trains two more steps from the newest checkpoint; some load data in a worker process.
            train(toy_ddpm_config(run_dir, max_steps=2 * cycle, checkpointing_steps=1, checkpoints_total_limit=LIMIT,
                                  resume_from_checkpoint="latest", num_workers=1 if cycle % 5 == 0 else 0))
        fallbacks += any("skipping checkpoint" in str(w.message) for w in caught)
        newest_two = [f"checkpoint-{2 * cycle - 1}", f"checkpoint-{2 * cycle}"]
        assert [p.name for p in list_checkpoints(checkpoints)] == newest_two
        assert len(list(checkpoints.iterdir())) == LIMIT  # and nothing else: no debris
        sizes.append((disk_use(checkpoints), disk_use(run_dir, but=("history.jsonl",))))
        if cycle == 2:
            baseline = (child_processes(), threading.active_count(), open_files())
    assert fallbacks == CYCLES // 10
    # Checkpoint and run sizes stay flat (a few bytes of JSON numbers aside); history.jsonl alone grows, by design.
    assert max(checkpoint for checkpoint, _ in sizes) <= 1.01 * sizes[1][0]
    assert max(run for _, run in sizes) <= 1.05 * sizes[1][1]
    children, threads, files = baseline
    assert child_processes() == children == before
    assert threading.active_count() <= threads
    assert open_files() <= files
