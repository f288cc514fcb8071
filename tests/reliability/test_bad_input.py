"""Bad input is refused with an error naming the thing and what would be valid, and nothing already
in the output folder is written over: configs, data folders, model folders, and an output folder
that holds another run."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from stagediff.pipelines.cli import main
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.data import BadImageError, DataConfig, DataSplits, load_data, read_image
from stagediff.pipelines.latents import check_vae_input, decode_latents
from stagediff.pipelines.run import is_stage_done

from helpers import tiny_vae_config

from .helpers import huge_png, snapshot, toy_ddpm_config, train, write_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """The raw config of a finished toy run, which no bad input may touch."""
    raw = toy_ddpm_config(tmp_path_factory.mktemp("finished") / "run", max_steps=2)
    train(raw)
    return raw


def refused(config_path: Path, message: str, untouched: Path) -> None:
    """`stagediff train --config CONFIG_PATH` exits with an error matching `message`, and `untouched`
    keeps every byte."""
    before = snapshot(untouched)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config_path)])
    assert re.search(message, str(exit_info.value.code)), exit_info.value.code
    assert snapshot(untouched) == before


def ddpm_block(raw: dict) -> dict:
    return raw["stages"][0]


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: ddpm_block(raw)["training"].update(max_stpes=3),
     r"stages\.ddpm\.training\.max_stpes: unknown key \(did you mean 'max_steps'\?\); valid keys: max_steps"),
    (lambda raw: ddpm_block(raw)["training"].update(batch_size=[32]),
     r"stages\.ddpm\.training\.batch_size: expected int, got \[32\] \(list\)"),
    (lambda raw: ddpm_block(raw)["training"].update(learning_rate=-1e-3),
     r"stages\.ddpm\.training\.learning_rate: -0\.001 is not valid; expected a number > 0"),
    (lambda raw: ddpm_block(raw)["training"].update(max_nonfinite_skips=-1),
     r"stages\.ddpm\.training\.max_nonfinite_skips: -1 is not valid; expected an integer >= 0"),
    (lambda raw: ddpm_block(raw)["training"].update(prefetch_factor=4),  # with num_workers 0
     r"stages\.ddpm\.training\.prefetch_factor: 4 is not valid; expected null, or an integer >= 1 when "
     r"num_workers > 0"),
    (lambda raw: raw["data"].update(max_bad_fraction=1.5),
     r"data\.max_bad_fraction=1\.5 is invalid: expected a number in \[0, 1\)"),
    (lambda raw: ddpm_block(raw)["model"].update(num_inference_steps=60),
     r"stages\.ddpm\.model\.num_inference_steps: 60 is not valid; with num_train_timesteps 50 and sampler "
     r"dpmsolver expected at most 49"),
    (lambda raw: ddpm_block(raw)["model"].update(num_inference_steps=50),  # DPM-Solver would step by 50 // 51 = 0
     r"stages\.ddpm\.model\.num_inference_steps: 50 is not valid"),
    (lambda raw: ddpm_block(raw).update(name="../escape"),
     r"stages\[0\]\.name: '\.\./escape' is not valid; expected a folder name of letters, digits"),
    (lambda raw: ddpm_block(raw).update(name="nested/stage"), r"stages\[0\]\.name: 'nested/stage' is not valid"),
    (lambda raw: raw["data"].update(toy="ring9"), r"data\.toy='ring9' is invalid: expected one of \['ring8'"),
])
def test_a_bad_config_is_refused_naming_the_key(finished, tmp_path, mutate, message):
    raw = toy_ddpm_config(finished["output_dir"])
    mutate(raw)
    path = write_config(tmp_path / "bad.yaml", raw)
    refused(path, re.escape(str(path)) + ": " + message, Path(finished["output_dir"]))


def test_malformed_yaml_is_refused_naming_the_file(finished, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(toy_ddpm_config(finished["output_dir"]))[:-40] + "\n  - [unclosed\n")
    refused(path, re.escape(str(path)) + r": not valid YAML", Path(finished["output_dir"]))


def test_a_resolution_the_vae_cannot_downsample_is_refused_before_any_work(finished, tmp_path):
    raw = tiny_vae_config(finished["output_dir"])
    raw["data"]["resolution"] = 14
    raw["stages"][0]["model"]["block_out_channels"] = [8, 16, 16]  # downsamples by 4
    refused(write_config(tmp_path / "bad.yaml", raw),
            r"stages\.vae\.model\.block_out_channels: 3 blocks downsample by 4, which does not divide the "
            r"resolution 14x14", Path(finished["output_dir"]))
    assert not (Path(finished["output_dir"]) / "vae").exists()


# --------------------------------------------------------------------------- stages that do not fit together


def test_an_input_stage_that_is_not_a_fitting_vae_is_named(trained_vae, tmp_path):
    vae_run = Path(trained_vae["output_dir"]) / "vae"
    digits = DataSplits([], [], (1, 16, 16), "image", 10, "digits")
    assert check_vae_input("ldm", digits, vae_run) == vae_run / "vae"
    with pytest.raises(ValueError, match=rf"stages\.ldm\.input: {re.escape(str(tmp_path))} holds no trained VAE "
                                         r"\(no vae/config\.json\)"):
        check_vae_input("ldm", digits, tmp_path)
    rgb = DataSplits([], [], (3, 16, 16), "image", 10, "rgb digits")
    with pytest.raises(ValueError, match=r"was trained on 1x16x16 images, the data is 3x16x16"):
        check_vae_input("ldm", rgb, vae_run)

    unet_run = tmp_path / "pixel_ddpm"
    (unet_run / "vae").mkdir(parents=True)
    (unet_run / "vae" / "config.json").write_text('{"_class_name": "UNet2DModel", "in_channels": 1, "sample_size": 16}')
    with pytest.raises(ValueError, match=r"vae/config\.json describes a UNet2DModel, not a VAE \(AutoencoderKL\); "
                                         r"input: must name a vae stage"):
        check_vae_input("ldm", digits, unet_run)
    unfinished = tmp_path / "unfinished"
    (unfinished / "vae").mkdir(parents=True)
    (unfinished / "vae" / "config.json").write_text((vae_run / "vae" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"has no diffusion_pytorch_model\.safetensors: its VAE stage did not finish"):
        check_vae_input("ldm", digits, unfinished)


def test_latents_of_another_width_than_the_vae_are_named(trained_vae):
    vae_dir = Path(trained_vae["output_dir"]) / "vae" / "vae"
    with pytest.raises(ValueError, match=rf"{re.escape(str(vae_dir))}: this VAE decodes 2-channel latents, the "
                                         r"samples have 3 channels"):
        decode_latents(vae_dir, torch.zeros(1, 3, 8, 8))


# --------------------------------------------------------------------------- model folders


def test_sampling_more_steps_than_the_model_was_trained_with_is_refused(finished, tmp_path):
    with pytest.raises(SystemExit, match=r"stagediff sample: error: `num_inference_steps`: 500 cannot be larger than "
                                         r"`self\.config\.train_timesteps`: 50"):
        main(["sample", f"{finished['output_dir']}/ddpm", "--sampler", "ddim", "--steps", "500", "--n", "2",
              "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("remove, named", [
    ("unet", "unet"), ("unet/diffusion_pytorch_model.safetensors", "unet"), ("stagediff.json", "stagediff.json"),
    ("done.json", "."),  # not a finished stage folder at all
])
def test_a_model_folder_missing_files_is_named(finished, tmp_path, remove, named):
    folder = tmp_path / "ddpm"
    shutil.copytree(Path(finished["output_dir"]) / "ddpm", folder)
    missing = folder / remove
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    # diffusers' own loading errors (OSError) name the folder too; the CLI's own errors exit with a message.
    with pytest.raises((OSError, SystemExit), match=re.escape(str(folder / named))):
        main(["sample", str(folder), "--n", "2", "--out", str(tmp_path / "out")])


# --------------------------------------------------------------------------- data folders


def image_folder_config(output_dir, folder) -> dict:
    raw = tiny_vae_config(output_dir, max_steps=2, batch_size=4)
    raw["data"] = {"source": "imagefolder", "train_data_dir": str(folder), "resolution": 8}
    return raw


def save_images(folder: Path, count: int) -> None:
    for index in range(count):
        (folder / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (9 + index, 12), (20 * index, 0, 0)).save(folder / f"class{index % 2}" / f"{index}.png")


@pytest.mark.parametrize("fill, message", [
    (None, r"data\.train_data_dir: {folder} does not exist or is not a folder"),
    (lambda folder: folder.mkdir(), r"data\.train_data_dir: {folder} is empty"),
    (lambda folder: (folder.mkdir(), (folder / "notes.txt").write_text("no pictures")),
     r"data\.train_data_dir: {folder} holds 1 file\(s\) but no images \(expected extensions such as \.png"),
    (lambda folder: (save_images(folder, 6), (folder / "metadata.csv").write_text("caption\nhello\n")),
     r"data\.train_data_dir: {folder} cannot be read as an image folder: .*file_name"),
])
def test_an_unusable_data_folder_is_named(finished, tmp_path, fill, message):
    folder = tmp_path / "images"
    if fill:
        fill(folder)
    path = write_config(tmp_path / "run.yaml", image_folder_config(finished["output_dir"], folder))
    refused(path, message.format(folder=re.escape(str(folder))), Path(finished["output_dir"]))


def test_a_truncated_image_stops_training_naming_the_file(tmp_path):
    folder = tmp_path / "images"
    save_images(folder, 8)
    bad = folder / "class1" / "7.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(SystemExit, match=rf"stagediff train: error: {re.escape(str(bad))}: cannot read image"):
        main(["train", "--config", str(write_config(tmp_path / "run.yaml",
                                                    image_folder_config(tmp_path / "run", folder)))])


def train_paths(raw: dict) -> list[Path]:
    """The image files of a run's train split, in split order."""
    train = load_data(parse_run_config(raw).data).train
    return [Path(train.dataset.rows[index]["image"]["path"]) for index in train.indices]


def test_a_mostly_unreadable_folder_stops_training_naming_the_fraction_and_files(tmp_path):
    folder = tmp_path / "images"
    save_images(folder, 10)
    raw = image_folder_config(tmp_path / "run", folder)
    raw["data"].update(skip_bad_images=True, validation_fraction=0.3)  # max_bad_fraction: 0.1 by default
    bad = train_paths(raw)[:5]  # of 7
    for path in bad:
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(write_config(tmp_path / "run.yaml", raw))])
    message = str(exit_info.value.code)
    assert re.match(rf"stagediff train: error: imagefolder {re.escape(str(folder))}: at least [1-5] of its 7 training "
                    r"images are unreadable \(\d+\.\d%\), more than data\.max_bad_fraction=0\.1: ", message), message
    assert any(str(path) in message for path in bad)


def test_a_few_unreadable_images_are_skipped_with_one_warning_from_worker_processes(tmp_path):
    folder = tmp_path / "images"
    save_images(folder, 10)
    raw = image_folder_config(tmp_path / "run", folder)  # 2 steps of 4 images: one epoch of the 8 training images
    raw["data"].update(skip_bad_images=True, validation_fraction=0.2, max_bad_fraction=0.2)
    raw["stages"][0]["training"]["num_workers"] = 1
    bad = train_paths(raw)[3]
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.warns(UserWarning) as caught:
        metrics = train(raw)["vae"]
    assert [str(w.message) for w in caught if "unreadable" in str(w.message)] == [
        f"imagefolder {folder}: skipped 1 unreadable image(s) of 8 training images, each replaced by the next "
        f"readable one: {bad}"]
    assert metrics["bad_images"] == 1


def test_files_that_are_not_images_are_ignored(tmp_path):
    save_images(tmp_path, 6)
    (tmp_path / "class0" / "notes.txt").write_text("not a picture")
    (tmp_path / "labels.csv").write_text("a,b\n1,2\n")
    data = load_data(DataConfig(source="imagefolder", train_data_dir=str(tmp_path), resolution=8))
    assert len(data.train) + len(data.validation) == 6


def test_a_huge_image_is_refused_naming_the_file():
    with pytest.raises(BadImageError, match=r"big/bomb\.png: cannot read image \(.*decompression bomb"):
        read_image({"bytes": huge_png(50_000, 50_000), "path": "big/bomb.png"}, "row 0", DataConfig(resolution=8))


# --------------------------------------------------------------------------- an output folder holding another run


def test_an_output_folder_holding_another_run_is_refused_unless_overwrite(finished, tmp_path):
    output = Path(finished["output_dir"])
    other_seed = write_config(tmp_path / "seed1.yaml", {**toy_ddpm_config(output), "seed": 1})
    refused(other_seed, rf"output_dir: {re.escape(str(output))} holds another run, which this one would "
                        rf"overwrite:\n  {re.escape(str(output / 'ddpm'))}: seed is 0 there, 1 here\n"
                        r"Choose another output_dir, or pass --overwrite", output)
    wider = toy_ddpm_config(output)
    ddpm_block(wider)["model"]["mlp_hidden"] = 32
    refused(write_config(tmp_path / "wider.yaml", wider),
            r"ddpm: stages\.ddpm\.model\.mlp_hidden is 16 there, 32 here", output)

    # A rerun of the same config is not refused: it skips its finished stage and writes nothing.
    before = snapshot(output)
    main(["train", "--config", str(write_config(tmp_path / "same.yaml", finished))])
    assert snapshot(output) == before


def test_overwrite_replaces_the_other_run(finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished["output_dir"], output)
    (output / "ddpm" / "mine.txt").write_text("a file of the other run")
    seed1 = {**toy_ddpm_config(output), "seed": 1}
    main(["train", "--config", str(write_config(tmp_path / "seed1.yaml", seed1)), "--overwrite"])
    assert yaml.safe_load((output / "ddpm" / "config.yaml").read_text())["seed"] == 1
    assert not (output / "ddpm" / "mine.txt").exists() and is_stage_done(parse_run_config(seed1), "ddpm")
    longer = {**toy_ddpm_config(output, max_steps=3), "seed": 1}  # training settings may change: not another run
    main(["train", "--config", str(write_config(tmp_path / "longer.yaml", longer))])
    assert yaml.safe_load((output / "ddpm" / "config.yaml").read_text())["stages"][0]["training"]["max_steps"] == 3


@pytest.mark.parametrize("plant, message", [
    (lambda stage: (stage.mkdir(parents=True), (stage / "weights.bin").write_bytes(b"mine")),
     "it holds files but no config.yaml of a stagediff run"),
    (lambda stage: (stage.mkdir(parents=True), (stage / "config.yaml").write_text("[not, a, run]")),
     "its config.yaml is not a stagediff run config"),
])
def test_a_stage_folder_that_is_not_a_run_of_this_config_is_refused(tmp_path, plant, message):
    plant(tmp_path / "run" / "ddpm")
    refused(write_config(tmp_path / "run.yaml", toy_ddpm_config(tmp_path / "run")),
            re.escape(message), tmp_path / "run")
