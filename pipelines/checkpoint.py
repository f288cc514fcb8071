"""Kill-safe checkpoints: complete or invisible.

A checkpoint is written into `.tmp-checkpoint-STEP/` by `accelerator.save_state` (model as
safetensors, optimizer/scheduler/RNG states loaded back with `weights_only=True`), plus our own
`ema.safetensors` and `trainer_state.json`, and only then renamed to `checkpoint-STEP/` (an atomic
rename on POSIX). A kill at any point leaves the previous checkpoints untouched, and `latest`
never sees a half-written one. Rotation deletes the oldest only after the new one is in place.
"""

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str | None, root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint under root (None when there is none yet); a path -> that path."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no {TRAINER_STATE}); use 'latest' or one of {list_checkpoints(root)}")
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def save_checkpoint(accelerator: Accelerator, root: Path, trainer_state: dict, write_extra,
                    total_limit: int | None) -> Path:
    """Save the full training state atomically; every process must call this.

    `trainer_state` (JSON: at least the step) is written last; `write_extra(folder)` is called on
    the main process to add files (EMA and best weights, config) before the folder becomes visible.
    """
    step = trainer_state["step"]
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a killed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extra(tmp)
        _write_json_synced(tmp / TRAINER_STATE, trainer_state)
        if final.exists():  # re-saving the same step, e.g. after a resume at that step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _write_json_synced(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
