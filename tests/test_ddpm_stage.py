"""Stage 2: latent, pixel and vector DDPMs trained by the one loop, exported in diffusers layout."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DModel

from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.diffusion import SAMPLERS, LatentDiffusionPipeline, make_sampler
from stagediff.pipelines.run import run

from helpers import tiny_vae_config

TINY_UNET = {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 8,
             "num_train_timesteps": 100, "num_inference_steps": 5, "num_eval_samples": 16}


def staged_config(output_dir, **data):
    raw = tiny_vae_config(output_dir)
    raw["data"].update(data)
    raw["stages"].append({"name": "ldm", "kind": "ddpm", "input": "vae", "model": dict(TINY_UNET),
                          "training": {"max_steps": 3, "batch_size": 16, "log_every": 1}})
    return raw


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    config = parse_run_config(staged_config(tmp_path_factory.mktemp("staged") / "run"))
    results = run(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    return config, results


def test_staged_run_exports_a_latent_diffusion_pipeline(staged_run):
    config, results = staged_run
    folder = f"{config.output_dir}/ldm"
    index = json.load(open(f"{folder}/model_index.json"))
    assert index["_class_name"] == "LatentDiffusionPipeline"
    # Each component loads with stock diffusers classes, and the latent scale travels with the VAE.
    vae = AutoencoderKL.from_pretrained(f"{folder}/vae")
    unet = UNet2DModel.from_pretrained(f"{folder}/unet")
    assert not DDPMScheduler.from_pretrained(f"{folder}/scheduler").config.clip_sample  # latents are unbounded
    assert vae.config.scaling_factor == pytest.approx(results["vae"]["scaling_factor"])
    assert (unet.config.in_channels, unet.config.sample_size) == (2, 8)  # 16x16x1 -> 8x8x2 latents

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    a = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="pt").images
    reloaded = LatentDiffusionPipeline.from_pretrained(folder)
    b = reloaded(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)


def test_latents_are_cached_once_with_the_vaes_hash(staged_run):
    config, _ = staged_run
    caches = list((Path(config.output_dir) / "ldm" / "cache").glob("latents-*"))
    assert len(caches) == 1
    from stagediff.pipelines.latents import open_cache
    train = open_cache(caches[0])["train"].samples
    assert train.shape == (256, 2, 8, 8)
    # Scaled by the VAE's scaling factor: unit standard deviation over the training set.
    assert train.std().item() == pytest.approx(1.0, rel=0.05)


def test_staged_rerun_skips_finished_stages_and_force_retrains(staged_run, capsys):
    config, results = staged_run
    assert run(config) == results
    out = capsys.readouterr().out
    assert "[vae] outputs" in out and "[ldm] outputs" in out and out.count("skipped") == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    config.stages[1].training.max_steps = 4  # a changed stage retrains; the stage before it is kept
    run(config)
    out = capsys.readouterr().out
    assert "[vae] outputs" in out and "[ldm] outputs" not in out


def test_a_stage_whose_input_does_not_match_stops_with_the_reason(staged_run, tmp_path):
    config, _ = staged_run
    mismatched = parse_run_config(staged_config(config.output_dir, resolution=32))
    mismatched.stages = mismatched.stages[1:]  # the trained 16x16 VAE, but 32x32 data
    mismatched.stages[0].input = None
    from stagediff.pipelines.stages.ddpm import DDPMStage
    from stagediff.pipelines.data import load_data
    with pytest.raises(ValueError, match=r"stages\.ldm\.input: the VAE in .* was trained on 1x16x16 images, the data is 1x32x32"):
        DDPMStage(mismatched.stages[0], load_data(mismatched.data), Path(config.output_dir) / "vae")


def test_pixel_ddpm_exports_a_stock_ddpm_pipeline(tmp_path):
    raw = tiny_vae_config(tmp_path / "run")
    raw["data"]["resolution"] = 8
    raw["stages"] = [{"name": "ddpm", "kind": "ddpm", "model": dict(TINY_UNET),
                      "training": {"max_steps": 2, "batch_size": 16}}]
    config = parse_run_config(raw)
    run(config)
    pipe = DDPMPipeline.from_pretrained(f"{config.output_dir}/ddpm")
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    # Pixels lie in [-1, 1]: every sampler clips its x_0 estimate there (the stock pipeline too);
    # latents are not clipped.
    assert pipe.scheduler.config.clip_sample
    for sampler in SAMPLERS:
        scheduler = make_sampler(sampler, pipe.scheduler.config)
        assert scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"), sampler
    dpm = make_sampler("dpmsolver", pipe.scheduler.config)
    x0 = torch.full((1, 1, 8, 8), 7.0)
    assert dpm._threshold_sample(x0).max() == 1.0  # the clamp, not a rescaling
