"""Checkpoints, exported weights and latent caches that were truncated or corrupted after they
were written: detected at load with the file's name; `latest` falls back to the newest intact
checkpoint with a warning; a damaged cache is encoded again."""

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file

from stagediff.pipelines.checkpoint import CorruptCheckpointError, resolve_checkpoint
from stagediff.pipelines.cli import main
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.data import DataConfig, load_data
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


@pytest.fixture
def encode(trained_vae, digits, tmp_path):
    """Encode the run's data with its VAE into tmp_path/cache (or read the cache); returns the train latents."""
    vae_dir = Path(trained_vae["output_dir"]) / "vae" / "vae"
    accelerator = Accelerator(cpu=True)
    return lambda: cached_latents(vae_dir, digits, "mean", tmp_path / "cache", accelerator).train.samples


@pytest.mark.parametrize("how, problem", [(truncate, "is unreadable"), (empty, "is unreadable"),
                                          (flip_a_byte, "is truncated or corrupted")])
def test_a_damaged_latent_cache_is_named_and_encoded_again(encode, tmp_path, how, problem):
    clean = encode()
    [path] = (tmp_path / "cache").glob("latents-*.safetensors")
    damage(path, how)
    with pytest.warns(UserWarning, match=rf"latent cache {re.escape(str(path))} {problem}.*encoding the latents again"):
        assert torch.equal(encode(), clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(encode(), clean)  # the cache is whole again


def test_a_cache_made_from_something_else_is_not_used(encode, tmp_path):
    clean = encode()
    [path] = (tmp_path / "cache").glob("latents-*.safetensors")
    tensors = load_file(path)
    save_file({k: v + 1 for k, v in tensors.items()}, path, metadata={"key": "another VAE", "sha256": "-"})
    with pytest.warns(UserWarning, match="was made from another VAE, data or latent mode"):
        assert torch.equal(encode(), clean)


def test_a_half_written_cache_is_never_read_and_is_swept(encode, tmp_path):
    clean = encode()
    [path] = (tmp_path / "cache").glob("latents-*.safetensors")
    debris = path.with_name(f".tmp-4242-{path.name}")  # what a kill while writing leaves
    debris.write_bytes(truncate(path.read_bytes()))
    path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(encode(), clean)
    assert not debris.exists() and path.is_file()


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
