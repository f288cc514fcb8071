"""The sampling module: a finished stage folder in, samples and their metrics out, with the same
metrics `stagediff evaluate` reports as the stage itself reported at the end of training."""

import json
from pathlib import Path

import pytest
import torch

from stagediff.pipelines.cli import main
from diffusers import DDPMScheduler

from stagediff.pipelines.diffusion import SAMPLERS, make_sampler, sampler_and_steps
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.run import run
from stagediff.pipelines.sampling import evaluate_generation, generate, resolve_stage_dir
from stagediff.pipelines.stages.gan import GANStage

from helpers import tiny_vae_config

VALIDATION_KEYS = {"val_d_real", "val_d_fake", "train_seconds", "effective_batch_size", "num_processes"}


@pytest.fixture(scope="module")
def latent_gan_run(tmp_path_factory):
    raw = tiny_vae_config(tmp_path_factory.mktemp("sampling") / "run", max_steps=2)
    raw["stages"].append({"name": "latent_gan", "kind": "gan", "input": "vae",
                          "model": {"latent_dim": 8, "base_channels": 8, "max_channels": 16, "num_eval_samples": 16},
                          "training": {"max_steps": 2, "batch_size": 16}})
    config = parse_run_config(raw)
    return config, run(config)


def test_resolve_stage_dir_takes_a_run_folders_last_stage_and_its_class(latent_gan_run):
    config, _ = latent_gan_run
    stage_dir, stage_kind = resolve_stage_dir(config.output_dir)  # a str will do
    assert stage_dir.name == "latent_gan" and stage_kind is GANStage


def test_generate_is_a_function_of_the_seed(latent_gan_run):
    config, _ = latent_gan_run
    stage_dir = Path(config.output_dir) / "latent_gan"
    first = generate(stage_dir, 6, seed=3, batch_size=4)
    assert first.shape == (6, 1, 16, 16) and first.abs().max() <= 1
    assert torch.equal(first, generate(stage_dir, 6, seed=3, batch_size=4))
    assert not torch.equal(first, generate(stage_dir, 6, seed=4, batch_size=4))


def test_evaluate_reports_what_the_stage_reported_after_training(latent_gan_run, tmp_path, capsys):
    """One evaluation code path: `stagediff evaluate` of a latent GAN gives every generation metric
    the stage gave at the end of training, the FD of its VAE's prior included."""
    config, results = latent_gan_run
    stage_dir = Path(config.output_dir) / "latent_gan"
    report = evaluate_generation(stage_dir, 16, [0, 1], batch_size=8)
    trained = set(results["latent_gan"]) - VALIDATION_KEYS
    assert trained <= set(report["mean"]) and "fd_vae_prior" in trained
    assert [r["seed"] for r in report["per_seed"]] == [0, 1]
    assert (report["sampler"], report["steps"]) == ("dpmsolver", 20)

    out = tmp_path / "evaluation.json"
    main(["evaluate", str(stage_dir), "--n", "16", "--seeds", "2", "--batch-size", "8", "--out", str(out)])
    printed = json.loads(out.read_text())
    assert printed == json.loads(capsys.readouterr().out)
    timing = "sampling_seconds_per_sample"  # the one value that is not a function of the seeds
    assert {k: v for k, v in printed["mean"].items() if k != timing} == pytest.approx(
        {k: v for k, v in report["mean"].items() if k != timing}, rel=1e-9)


@pytest.mark.parametrize("asked, resolved", [
    ((None, None), ("dpmsolver", 20)),  # DPM-Solver++ in 20 steps by default
    (("ddpm", None), ("ddpm", None)),  # the seed's ancestral sampler: all T steps
    (("ddpm", 50), ("ddpm", 50)),
    (("ddim", None), ("ddim", 20)),
    ((None, 7), ("dpmsolver", 7)),
])
def test_the_sampler_defaults_rule(asked, resolved):
    assert sampler_and_steps(*asked) == resolved


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_sampler_steps_through_the_same_timesteps_before_and_after_export(sampler, tmp_path):
    """Training-time evaluation (a fresh training scheduler) and `stagediff sample` (the scheduler
    reloaded from the stage folder) must sample the same way."""
    fresh = DDPMScheduler(num_train_timesteps=1000)
    fresh.save_pretrained(tmp_path)
    timesteps = []
    for config in (fresh.config, DDPMScheduler.from_pretrained(tmp_path).config):
        scheduler = make_sampler(sampler, config)
        scheduler.set_timesteps(20)
        timesteps.append(scheduler.timesteps.tolist())
    assert timesteps[0] == timesteps[1]
