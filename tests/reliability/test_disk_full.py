"""A full disk while saving: a clear error naming what failed, the previous checkpoint intact and
still the one `latest` resumes from, and the space of the partial file given back."""

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from stagediff.pipelines import latents
from stagediff.pipelines.checkpoint import list_checkpoints, resolve_checkpoint
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.data import load_data

from .helpers import assert_same_weights, exported, snapshot, toy_ddpm_config, train


def fill_the_disk(path, written: bytes = b"\0" * 64):
    """What a write onto a full disk does: some bytes land, then ENOSPC."""
    Path(path).write_bytes(written)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    def config(max_steps):
        return toy_ddpm_config(tmp_path / "run", max_steps=max_steps, checkpointing_steps=2,
                               resume_from_checkpoint="latest")

    train(config(2))
    root = tmp_path / "run" / "ddpm" / "checkpoints"
    before = snapshot(root)
    # accelerate writes the optimizer state with torch.save: the disk fills up there.
    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: fill_the_disk(f))
    with pytest.raises(OSError, match=re.escape(
            f"saving {root / 'checkpoint-4'} failed: [Errno 28] No space left on device: "
            f"'{root / '.tmp-checkpoint-4' / 'optimizer.bin'}'; the last complete checkpoint, "
            f"{root / 'checkpoint-2'}, is intact")) as error:
        train(config(4))
    assert error.value.errno == errno.ENOSPC
    assert snapshot(root) == before  # the partial checkpoint-4 is gone, checkpoint-2 untouched
    assert not (tmp_path / "run" / "ddpm" / "done.json").exists()
    monkeypatch.undo()

    assert resolve_checkpoint("latest", root) == root / "checkpoint-2"
    train(config(4))  # space freed: the same command resumes from checkpoint-2
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]
    train(toy_ddpm_config(tmp_path / "straight", max_steps=4))
    assert_same_weights(exported(tmp_path / "run"), exported(tmp_path / "straight"))


def test_a_full_disk_while_caching_latents_leaves_no_file(trained_vae, tmp_path, monkeypatch):
    data = load_data(parse_run_config(trained_vae).data)
    monkeypatch.setattr(latents, "save_file", lambda tensors, path, metadata: fill_the_disk(path))
    with pytest.raises(OSError, match="No space left on device"):
        latents.cached_latents(Path(trained_vae["output_dir"]) / "vae" / "vae", data, "mean", tmp_path / "cache",
                               Accelerator(cpu=True))
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]  # no shard, no temporary file
