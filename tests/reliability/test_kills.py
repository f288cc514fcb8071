"""kill -9 of a real `stagediff train` process, during a step, a checkpoint save and latent caching,
then a resume from `latest`: training continues from the last complete checkpoint and (for a kill after
a checkpoint) ends with the weights of an uninterrupted run; nothing half-written is ever picked up."""

import json
import random

from safetensors import safe_open

from stagediff.pipelines.checkpoint import TMP_PREFIX, list_checkpoints, resolve_checkpoint
from stagediff.pipelines.latents import MANIFEST, SHARD_HEADER_KEY, tensors_digest

from .helpers import (FAKE_TOKEN, assert_same_weights, copy_run, exported, files_containing, kill_when,
                      start_training, step_of, toy_ddpm_config, train, with_latent_ddpm, write_config)

SEED = 9  # the kill points are drawn from it: the same points on every run of the suite


def kill_and_resume(tmp_path, capsys, checkpointing_steps: int, kill_point) -> tuple:
    """Train toward a million steps in a subprocess, kill it where `kill_point(checkpoints_dir)` holds,
    resume to 5 steps past the newest complete checkpoint; return (that checkpoint, the checkpoints folder)."""
    def config(max_steps, **training):
        return toy_ddpm_config(tmp_path / "killed", max_steps=max_steps, checkpointing_steps=checkpointing_steps,
                               checkpoints_total_limit=3, **training)

    raw = config(1_000_000)
    checkpoints = tmp_path / "killed" / "ddpm" / "checkpoints"
    log = tmp_path / "train.log"
    kill_when(start_training(write_config(tmp_path / "killed.yaml", raw), log), lambda: kill_point(checkpoints),
              random.Random(SEED), log)
    assert FAKE_TOKEN not in log.read_text() and not files_containing(tmp_path / "killed", FAKE_TOKEN)

    last = resolve_checkpoint("latest", checkpoints)
    target = step_of(last) + 5
    capsys.readouterr()
    train(config(target, resume_from_checkpoint="latest"))  # `stagediff train` again, run to `target` steps
    assert f"resumed from {last} at step {step_of(last)}" in capsys.readouterr().out

    straight = toy_ddpm_config(tmp_path / "straight", max_steps=target, checkpointing_steps=checkpointing_steps)
    train(straight)
    assert_same_weights(exported(tmp_path / "killed"), exported(tmp_path / "straight"))
    return last, checkpoints


def test_a_kill_during_a_step_resumes_to_the_uninterrupted_weights(tmp_path, capsys):
    after = random.Random(SEED).randint(4, 12)

    def between_saves(checkpoints):  # a checkpoint at or after `after` is complete, no save under way
        done = list_checkpoints(checkpoints)
        return done and step_of(done[-1]) >= after and not list(checkpoints.glob(f"{TMP_PREFIX}*"))

    last, _ = kill_and_resume(tmp_path, capsys, checkpointing_steps=2, kill_point=between_saves)
    assert step_of(last) >= after


def test_a_kill_during_a_checkpoint_save_never_exposes_the_partial_checkpoint(tmp_path, capsys):
    after = random.Random(SEED + 1).randint(4, 12)
    debris = []

    def mid_save(checkpoints):  # a save has written some files but not yet renamed its folder
        partial = [p for p in checkpoints.glob(f"{TMP_PREFIX}*") if any(p.iterdir())]
        debris[:] = partial
        return partial and int(partial[0].name[len(TMP_PREFIX):]) > after and list_checkpoints(checkpoints)

    last, checkpoints = kill_and_resume(tmp_path, capsys, checkpointing_steps=1, kill_point=mid_save)
    # The kill fell inside the save of the step after `last`: that checkpoint never became visible...
    assert [p.name for p in debris] == [f"{TMP_PREFIX}{step_of(last) + 1}"]
    # ...the resumed run trained from `last` (weights checked above), and its first save swept the debris.
    assert not list(checkpoints.glob(f"{TMP_PREFIX}*"))


def test_a_kill_during_latent_caching_leaves_no_cache_that_is_used(trained_vae, tmp_path):
    """Stage 1 is done; the subprocess skips it and is killed while encoding the digits for stage 2."""
    raw = with_latent_ddpm(copy_run(trained_vae, tmp_path / "killed"))
    ldm = tmp_path / "killed" / "ldm"
    cache = ldm / "cache"

    def caching():  # stage 2 has started and no complete cache (its manifest, written last) exists yet
        return (ldm / "config.yaml").is_file() and not list(cache.glob(f"latents-*/{MANIFEST}"))

    log = tmp_path / "train.log"
    kill_when(start_training(write_config(tmp_path / "killed.yaml", raw), log), caching, random.Random(SEED), log)
    assert "[vae] outputs" in log.read_text() and "cached" not in log.read_text()
    assert not list(cache.glob(f"latents-*/{MANIFEST}"))  # finished shards at most, and temporary files
    for shard in cache.glob("latents-*/*.safetensors"):  # no reader looks at the temporary ones
        assert_whole_shard(shard)

    train(raw)  # the same command again: stage 1 skipped, stage 2 encodes what is missing and trains
    [folder] = cache.glob("*")  # one complete cache, no debris
    assert sorted(p.name for p in folder.iterdir()) == [
        MANIFEST, "train-00000.safetensors", "validation-00000.safetensors"]
    for shard in folder.glob("*.safetensors"):
        assert_whole_shard(shard)
    assert (ldm / "done.json").is_file()


def assert_whole_shard(path):
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()[SHARD_HEADER_KEY])
        assert header["sha256"] == tensors_digest({name: f.get_tensor(name) for name in f.keys()})
