"""Kill-safe checkpoints: complete or invisible, and checked before use.

A checkpoint is written into `.tmp-checkpoint-STEP/` by `accelerator.save_state` (model as
safetensors, optimizer/scheduler/RNG states loaded back with `weights_only=True`), plus our own
`ema.safetensors` and `trainer_state.json`, and only then renamed to `checkpoint-STEP/` (an atomic
rename on POSIX). A kill at any point leaves the previous checkpoints untouched, and `latest`
never sees a half-written one. Rotation deletes the oldest only after the new one is in place.

`trainer_state.json`, written last, lists every other file with its size and SHA-256, so a file
truncated or corrupted afterwards (a full disk, a bad copy, a power loss before the data reached
the disk) is caught at load: `latest` warns and falls back to the newest checkpoint that is
intact; a checkpoint named explicitly fails with the file's name. A save that fails (disk full)
removes its partial folder and says which checkpoint is still the last complete one.
"""

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-checkpoint-"


class CorruptCheckpointError(ValueError):
    """A checkpoint or exported weights file that is missing, truncated or corrupted; the message names it."""


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str | None, root: Path) -> Path | None:
    """`latest` -> the newest intact checkpoint under root (None when there is none yet); a path ->
    that checkpoint, which must be intact."""
    if spec is None:
        return None
    if spec == "latest":
        for checkpoint in reversed(list_checkpoints(root)):
            try:
                verify_checkpoint(checkpoint)
                return checkpoint
            except CorruptCheckpointError as err:
                warnings.warn(f"resume_from_checkpoint=latest: skipping {checkpoint.name}: {err}; "
                              "falling back to the checkpoint before it", stacklevel=2)
        return None
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no {TRAINER_STATE}); use 'latest' or one of {list_checkpoints(root)}")
    verify_checkpoint(path)
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def verify_checkpoint(checkpoint: Path) -> None:
    """Check every file of `checkpoint` against the sizes and SHA-256 digests its trainer state
    recorded; raise CorruptCheckpointError naming the first file that differs."""
    state_file = checkpoint / TRAINER_STATE
    try:
        files = read_trainer_state(checkpoint)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{state_file} is unreadable or incomplete ({err!r})") from None
    verify_manifest(checkpoint, files, state_file)


def file_manifest(folder: Path, paths) -> dict[str, list]:
    """{path relative to `folder`: [size, SHA-256]} for `paths` (files inside `folder`)."""
    return {str(p.relative_to(folder)): [p.stat().st_size, hash_file(p).hexdigest()] for p in sorted(paths)}


def verify_manifest(folder: Path, files: dict[str, list], listed_in: Path) -> None:
    """Raise CorruptCheckpointError naming the first file of a `file_manifest` that is missing,
    has another size or another SHA-256 (safetensors checks its header, not its data)."""
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing (listed in {listed_in})")
        if path.stat().st_size != size:
            raise CorruptCheckpointError(f"{path} is truncated or overwritten: {path.stat().st_size} bytes, "
                                         f"{size} when it was saved")
        if hash_file(path).hexdigest() != digest:
            raise CorruptCheckpointError(f"{path} is corrupted: its SHA-256 differs from the one saved with it "
                                         f"(in {listed_in})")


def hash_file(path: Path, digest=None) -> "hashlib._Hash":
    """`digest` (a new SHA-256 by default) updated with the bytes of `path`, read in 1 MiB chunks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def save_checkpoint(accelerator: Accelerator, root: Path, trainer_state: dict, write_extra,
                    total_limit: int | None) -> Path:
    """Save the full training state atomically; every process must call this.

    `trainer_state` (JSON: at least the step) is written last, with the file list; `write_extra(folder)`
    is called on the main process to add files (EMA and best weights, config) before the folder
    becomes visible.
    """
    step = trainer_state["step"]
    final = root / f"checkpoint-{step}"
    tmp = root / f"{TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        for leftover in root.glob(f"{TMP_PREFIX}*"):  # of saves killed midway
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_extra(tmp)
            files = file_manifest(tmp, (p for p in tmp.rglob("*") if p.is_file()))
            _write_json_synced(tmp / TRAINER_STATE, {**trainer_state, "files": files})
            if final.exists():  # re-saving the same step, e.g. after a resume at that step
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except OSError as err:  # e.g. a full disk: free what the partial checkpoint took
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        kept = (f"the last complete checkpoint, {previous[-1]}, is intact" if previous
                else "there is no earlier checkpoint")
        raise OSError(err.errno, f"saving {final} failed: {err}; {kept}. Free space, then resume with "
                                 "training.resume_from_checkpoint=latest") from err
    if accelerator.is_main_process and total_limit is not None:
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
