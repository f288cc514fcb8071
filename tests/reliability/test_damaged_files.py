"""Checkpoints, exported weights and latent caches that were truncated or corrupted after they
were written: detected at load with the file's name; `latest` falls back to the newest intact
checkpoint with a warning; a damaged cache shard is encoded again, and only it."""

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from stagediff.pipelines.checkpoint import CorruptCheckpointError, resolve_checkpoint
from stagediff.pipelines.cli import main
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.data import DataConfig, load_data
from stagediff.pipelines import latents
from stagediff.pipelines.latents import cache_key, cached_latents

from .helpers import assert_same_weights, copy_run, exported, toy_ddpm_config, train, with_latent_ddpm, write_config


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_byte(data: bytes) -> bytes:  # in the payload, past any header: no parser would notice
    at = len(data) - 9
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def empty(data: bytes) -> bytes:
    return b""


def damage(path: Path, how) -> None:
    path.write_bytes(how(path.read_bytes()))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> dict:
    """A toy run of 6 steps with checkpoints at 2, 4 and 6."""
    raw = toy_ddpm_config(tmp_path_factory.mktemp("checkpointed") / "run", max_steps=6, checkpointing_steps=2,
                          checkpoints_total_limit=3)
    train(raw)
    return raw


@pytest.mark.parametrize("name, how", [
    ("model.safetensors", truncate), ("optimizer.bin", flip_a_byte), ("scheduler.bin", empty),
    ("random_states_0.pkl", flip_a_byte), ("ema.safetensors", truncate), ("trainer_state.json", truncate),
])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(checkpointed, tmp_path, name, how):
    root = Path(copy_run(checkpointed, tmp_path / "run")["output_dir"]) / "ddpm" / "checkpoints"
    bad = root / "checkpoint-6" / name
    damage(bad, how)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(bad))):
        resolve_checkpoint(str(root / "checkpoint-6"), root)
    with pytest.warns(UserWarning, match=rf"latest: skipping checkpoint-6: {re.escape(str(bad))}"):
        assert resolve_checkpoint("latest", root) == root / "checkpoint-4"


def test_a_missing_checkpoint_file_is_named(checkpointed, tmp_path):
    root = Path(copy_run(checkpointed, tmp_path / "run")["output_dir"]) / "ddpm" / "checkpoints"
    missing = root / "checkpoint-6" / "optimizer.bin"
    missing.unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(missing))} is missing"):
        resolve_checkpoint(str(root / "checkpoint-6"), root)


def test_training_resumes_from_the_newest_intact_checkpoint(checkpointed, tmp_path, capsys):
    raw = copy_run(checkpointed, tmp_path / "run")
    root = tmp_path / "run" / "ddpm" / "checkpoints"
    damage(root / "checkpoint-6" / "model.safetensors", flip_a_byte)
    resume = toy_ddpm_config(tmp_path / "run", max_steps=8, checkpointing_steps=2, checkpoints_total_limit=3,
                             resume_from_checkpoint="latest")
    with pytest.warns(UserWarning, match="skipping checkpoint-6"):
        train(resume)
    assert f"resumed from {root / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    train(toy_ddpm_config(tmp_path / "straight", max_steps=8))
    assert_same_weights(exported(raw["output_dir"]), exported(tmp_path / "straight"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_checkpoint("latest", root) == root / "checkpoint-8"  # the damaged one was saved anew


def test_resuming_from_a_named_damaged_checkpoint_stops_naming_the_file(checkpointed, tmp_path):
    copy_run(checkpointed, tmp_path / "run")
    bad = tmp_path / "run" / "ddpm" / "checkpoints" / "checkpoint-4" / "optimizer.bin"
    damage(bad, truncate)
    raw = toy_ddpm_config(tmp_path / "run", max_steps=8, resume_from_checkpoint=str(bad.parent))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(write_config(tmp_path / "resume.yaml", raw))])
    assert re.search(rf"stagediff train: error: {re.escape(str(bad))} is truncated or overwritten: \d+ bytes, \d+ "
                     "when it was saved", str(exit_info.value.code))


@pytest.mark.parametrize("how, problem", [(truncate, "is truncated or overwritten"), (flip_a_byte, "is corrupted")])
def test_a_damaged_exported_weights_file_is_named_at_load(checkpointed, tmp_path, how, problem):
    copy_run(checkpointed, tmp_path / "run")
    weights = tmp_path / "run" / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors"
    damage(weights, how)  # a flipped byte in the tensor data: safetensors itself would load it
    with pytest.raises(SystemExit, match=re.escape(f"{weights} {problem}")):
        main(["sample", str(tmp_path / "run" / "ddpm"), "--n", "4", "--steps", "2", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("how, problem", [(truncate, "is truncated or overwritten"), (flip_a_byte, "is corrupted")])
def test_a_latent_stage_on_a_damaged_vae_names_the_vae_file(trained_vae, tmp_path, how, problem):
    raw = with_latent_ddpm(copy_run(trained_vae, tmp_path / "run"))
    weights = tmp_path / "run" / "vae" / "vae" / "diffusion_pytorch_model.safetensors"
    damage(weights, how)
    with pytest.raises(ValueError, match=re.escape(f"{weights} {problem}")):
        train(raw)
    assert not list((tmp_path / "run" / "ldm" / "cache").glob("latents-*"))


# --------------------------------------------------------------------------- latent caches


@pytest.fixture(scope="module")
def digits(trained_vae):
    return load_data(parse_run_config(trained_vae).data)


SHARD = 64  # items per shard here: the 256 training digits make 4 shards, the 128 validation ones 2


@pytest.fixture
def encode(trained_vae, digits, tmp_path, monkeypatch):
    """Encode the run's data with its VAE into tmp_path/cache (or read the cache); returns the
    train latents. `encode.shards` lists the shards each call encoded."""
    vae_dir = Path(trained_vae["output_dir"]) / "vae" / "vae"
    accelerator = Accelerator(cpu=True)
    encoded = []
    write_shard = latents._write_shard
    monkeypatch.setattr(latents, "_write_shard", lambda path, *args: (encoded.append(path.name), write_shard(path, *args)))

    def call():
        encoded.clear()
        return cached_latents(vae_dir, digits, "mean", tmp_path / "cache", accelerator, shard_size=SHARD).train.samples

    call.shards = encoded
    return call


def shard_path(tmp_path, name="train-00001.safetensors") -> Path:
    [folder] = (tmp_path / "cache").glob("latents-*")
    return folder / name


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("how, problem", [
    (truncate, r"is truncated or overwritten: \d+ bytes, its header describes \d+"),
    (empty, "is unreadable: 0 bytes, no safetensors header"),
    (flip_a_byte, r"is corrupted \(its tensors do not match the SHA-256 in its header\)"),
    (None, "is missing")], ids=["truncated", "empty", "flipped", "deleted"])
def test_a_damaged_latent_cache_shard_is_named_and_encoded_again(encode, tmp_path, how, problem):
    clean = encode()
    assert len(encode.shards) == 6
    path = shard_path(tmp_path)
    delete(path) if how is None else damage(path, how)
    with pytest.warns(UserWarning, match=rf"latent cache shard {re.escape(str(path))} {problem}; encoding it again"):
        assert torch.equal(encode(), clean)
    assert encode.shards == [path.name]  # the other shards are kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(encode(), clean)  # the cache is whole again
    assert encode.shards == []


def test_a_latent_cache_shard_made_from_something_else_is_not_used(encode, tmp_path):
    clean = encode()
    path = shard_path(tmp_path)
    tensors = load_file(path)
    tensors["latents"] += 1
    header = {"key": "another VAE", "split": "train", "start": SHARD, "count": SHARD}
    latents._write_shard(path, tensors, header)  # whole, its SHA-256 right, but of another key
    with pytest.warns(UserWarning, match=f"{re.escape(str(path))} was made from another VAE, data or latent mode"):
        assert torch.equal(encode(), clean)


def test_a_damaged_latent_cache_manifest_is_named_and_written_again_from_the_shards(encode, tmp_path):
    clean = encode()
    manifest = shard_path(tmp_path, latents.MANIFEST)
    written = manifest.read_bytes()
    damage(manifest, truncate)
    with pytest.warns(UserWarning, match=rf"latent cache manifest {re.escape(str(manifest))} is unreadable"):
        assert torch.equal(encode(), clean)
    assert encode.shards == [] and manifest.read_bytes() == written  # every shard was checked and kept


def test_a_killed_latent_encode_resumes_from_its_finished_shards_and_never_reads_a_partial_one(encode, tmp_path):
    """What a kill while writing the third shard leaves: two shards, a partial temporary file, no manifest."""
    clean = encode()
    folder = shard_path(tmp_path).parent
    for path in folder.iterdir():
        if path.name not in ("train-00000.safetensors", "train-00001.safetensors"):
            path.unlink()
    debris = folder / ".tmp-4242-train-00002.safetensors"
    debris.write_bytes(truncate(shard_path(tmp_path).read_bytes()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(encode(), clean)
    assert "train-00000.safetensors" not in encode.shards and "train-00001.safetensors" not in encode.shards
    assert len(encode.shards) == 4 and not debris.exists()


def test_the_cache_key_covers_the_vae_the_data_files_and_the_mode(trained_vae, tmp_path):
    folder = tmp_path / "images" / "digits"
    folder.mkdir(parents=True)
    for index in range(4):
        Image.new("L", (16, 16), 40 * index).save(folder / f"{index}.png")
    data = load_data(DataConfig(source="imagefolder", train_data_dir=str(tmp_path / "images"), resolution=16))
    vae = Path(copy_run(trained_vae, tmp_path / "run")["output_dir"]) / "vae" / "vae"
    key = cache_key(vae, data, "mean")
    assert cache_key(vae, data, "sample") != key
    Image.effect_noise((16, 16), 64).save(folder / "0.png")  # same name, edited later
    later = (folder / "1.png").stat().st_mtime + 10
    os.utime(folder / "0.png", (later, later))
    assert cache_key(vae, data, "mean") != key
    key = cache_key(vae, data, "mean")
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 2 * config["scaling_factor"]}))
    assert cache_key(vae, data, "mean") != key  # a retrained (here: rescaled) VAE
