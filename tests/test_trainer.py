"""The one training loop: exact resume, checkpoints that are complete or invisible, NaN stops."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stagediff.pipelines.checkpoint import list_checkpoints, resolve_checkpoint, save_checkpoint
from stagediff.pipelines.run import make_accelerator, run
from stagediff.pipelines.trainer import NonFiniteLossError

from helpers import tiny_vae_config
from reliability.helpers import train, with_latent_ddpm


def final_weights(config):
    return load_file(f"{config.output_dir}/vae/vae/diffusion_pytorch_model.safetensors")


def test_resume_gives_identical_weights(tiny_config, tmp_path):
    # 8 steps straight vs 4 steps, a checkpoint, and a resumed run of the other 4; EMA included.
    # 16 x 4 = 64 images against 256 training images, so the resume lands mid-epoch. The first
    # half is its own run with max_steps=4, so the schedule is constant after a 2-step warm-up
    # (a cosine to 4 steps would differ from a cosine to 8; the kill tests cover that case).
    schedule = {"lr_scheduler": "constant", "lr_warmup_steps": 2, "ema_decay": 0.9}
    straight = tiny_config(max_steps=8, **schedule)
    straight.output_dir = str(tmp_path / "straight")
    run(straight)

    first_half = tiny_config(max_steps=4, checkpointing_steps=4, **schedule)
    first_half.output_dir = str(tmp_path / "halves")
    run(first_half)
    second_half = tiny_config(max_steps=8, resume_from_checkpoint="latest", **schedule)
    second_half.output_dir = first_half.output_dir
    run(second_half)

    a, b = final_weights(straight), final_weights(second_half)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = [json.loads(line) for line in open(f"{second_half.output_dir}/vae/history.jsonl")]
    straight_history = [json.loads(line) for line in open(f"{straight.output_dir}/vae/history.jsonl")]
    assert history[-1]["lr"] == pytest.approx(straight_history[-1]["lr"])
    assert history[-1]["loss"] == pytest.approx(straight_history[-1]["loss"], rel=1e-6)


def test_checkpoint_rotation_and_latest(tiny_config):
    config = tiny_config(max_steps=6, checkpointing_steps=2, checkpoints_total_limit=2)
    run(config)
    root = config.output_dir + "/vae/checkpoints"
    names = [p.name for p in list_checkpoints(Path(root))]
    assert names == ["checkpoint-4", "checkpoint-6"]
    assert resolve_checkpoint("latest", Path(root)).name == "checkpoint-6"
    checkpoint = Path(root) / "checkpoint-6"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.yaml").is_file()


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tiny_config, tmp_path):
    """A save that fails midway (here in write_extra) removes its partial folder; the previous
    checkpoint stays the latest, byte for byte (kills midway: tests/reliability/test_kills.py)."""
    config = tiny_config()
    accelerator = make_accelerator(config)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, {"step": 10}, lambda folder: None, total_limit=None)
    before = {p.name: p.read_bytes() for p in (root / "checkpoint-10").iterdir()}

    def crash(folder):
        raise OSError("simulated crash in the middle of writing")

    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(accelerator, root, {"step": 20}, crash, total_limit=1)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-10"]
    assert not (root / ".tmp-checkpoint-20").exists()  # a full disk gets its space back
    assert resolve_checkpoint("latest", root).name == "checkpoint-10"
    assert {p.name: p.read_bytes() for p in (root / "checkpoint-10").iterdir()} == before
    # The next save of that step completes.
    save_checkpoint(accelerator, root, {"step": 20}, lambda folder: None, total_limit=1)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-20"]


def test_nan_loss_stops_with_the_step(tiny_config):
    # An infinite decoder log-variance makes the very first loss non-finite.
    config = tiny_config(max_steps=6, checkpointing_steps=2, log_every=2)
    config.stages[0].model.decoder_log_var = float("inf")
    with pytest.raises(NonFiniteLossError, match="by step 2"):
        run(config)
    assert not list_checkpoints(Path(config.output_dir) / "vae" / "checkpoints")


def test_bf16_autocast_step_runs_on_cpu(tiny_config):
    """Correctness only: fp32 stays the CPU default (bf16 autocast is 5-9x slower here)."""
    config = tiny_config(max_steps=2)
    config.mixed_precision = "bf16"
    metrics = run(config)["vae"]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_early_stopping_keeps_the_best_validated_weights(tiny_config):
    """The seed's practice for flows, available to every stage: validate every few steps, stop when
    the monitored metric stops improving, export the best weights (not the last)."""
    # A warm-up to a learning rate too high for this VAE: validation improves at step 2, then
    # diverges (measured 411.6, 344.8, 927.1, 1186.7 nats under every ATEN_CPU_CAPABILITY), so
    # patience 2 stops training at step 4 of 12.
    config = tiny_config(max_steps=12, eval_every=1, early_stopping_patience=2, learning_rate=0.3,
                         lr_scheduler="constant", lr_warmup_steps=6)
    metrics = run(config)["vae"]
    history = [json.loads(line) for line in open(f"{config.output_dir}/vae/history.jsonl")]
    validations = [h["val/neg_elbo_nats"] for h in history if "val/neg_elbo_nats" in h]
    assert [h["step"] for h in history if "val/neg_elbo_nats" in h] == [1, 2, 3, 4]
    assert max(h["step"] for h in history) == 4  # stopped early: no step after the second bad validation
    best = min(validations)
    assert validations.index(best) == 1 and validations[-1] > best
    # The final evaluation uses the same seeded validation, so it reproduces the best value exactly:
    # the best weights were restored, not the last ones kept.
    assert metrics["neg_elbo_nats"] == pytest.approx(best, rel=1e-6)


def test_early_stopping_counts_validations_without_improvement():
    from stagediff.pipelines.trainer import _EarlyStopping

    model = torch.nn.Linear(1, 1)
    stopper = _EarlyStopping("loss", patience=2)
    assert not stopper.update({"loss": 3.0}, 1, model)
    assert not stopper.update({"loss": 2.0}, 2, model)
    assert not stopper.update({"loss": 2.5}, 3, model)
    assert stopper.update({"loss": 2.0}, 4, model)  # ties do not count as improvement
    assert (stopper.best, stopper.best_step) == (2.0, 2)


def test_a_later_stage_resumes_in_a_new_process_that_skips_the_stages_before(tmp_path):
    """The run that trained the VAE wrote the latent DDPM's checkpoints; a new process skips the
    VAE, and the checkpoints still fit the one model it prepares."""
    raw = with_latent_ddpm(tiny_vae_config(tmp_path / "run", max_steps=2), max_steps=2, checkpointing_steps=2)
    train(raw)
    checkpoint = tmp_path / "run" / "ldm" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "model_1.safetensors").exists()
    raw["stages"][1]["training"].update(max_steps=4, resume_from_checkpoint="latest")  # more steps: same run
    train(raw)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "ldm" / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
