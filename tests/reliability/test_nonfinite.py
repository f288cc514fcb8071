"""NaN/inf losses and gradients: stop naming the step (the default), or skip up to
`training.max_nonfinite_skips` steps, each logged and counted, the count kept across resumes; with
fp16, the steps the grad scaler skips are counted and logged."""

import itertools
import json
import math
import random

import pytest
import torch

from stagediff.modules.ddpm import EpsilonPredictionLoss
from stagediff.pipelines import run as run_module
from stagediff.pipelines.checkpoint import read_trainer_state
from stagediff.pipelines.trainer import NonFiniteLossError

from .helpers import assert_same_weights, exported, toy_ddpm_config, train

SEED = 9


def poison(monkeypatch, steps: set[int], where: str) -> None:
    """Make the training forward of the given (1-based) calls non-finite: the loss itself, or only
    the gradients (sqrt(0 * w) is 0 forward but d/dw = 0 / (2 sqrt(0)) = NaN backward)."""
    forward, calls = EpsilonPredictionLoss.forward, itertools.count(1)

    def poisoned(self, x):
        terms = forward(self, x)
        if next(calls) in steps:
            weights = sum(p.sum() for p in self.parameters())
            bad = terms["loss"] * math.nan if where == "loss" else terms["loss"] + torch.sqrt(weights * 0)
            terms = {**terms, "loss": bad}
        return terms

    monkeypatch.setattr(EpsilonPredictionLoss, "forward", poisoned)


def history(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{output_dir}/ddpm/history.jsonl")]


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_nonfinite_steps_are_skipped_up_to_the_limit_and_logged(tmp_path, monkeypatch, caplog, where):
    bad_steps = set(random.Random(SEED).sample(range(2, 11), 2))
    poison(monkeypatch, bad_steps, where)
    metrics = train(toy_ddpm_config(tmp_path / "run", max_steps=12, max_nonfinite_skips=2))["ddpm"]
    assert metrics["nonfinite_skips"] == 2 and math.isfinite(metrics["val_loss"])
    logs = history(tmp_path / "run")
    assert [h["nonfinite_skips"] for h in logs if h["step"] in bad_steps] == [1, 2]
    first, second = sorted(bad_steps)
    assert f"step {first}: non-finite loss or gradients; update skipped (1 of at most 2" in caplog.text
    assert f"step {second}: non-finite loss or gradients; update skipped (2 of at most 2" in caplog.text
    assert all(torch.isfinite(w).all() for w in exported(tmp_path / "run").values())


def test_a_skipped_step_leaves_the_weights_as_they_were(tmp_path, monkeypatch):
    train(toy_ddpm_config(tmp_path / "five", max_steps=5, ema_decay=None))
    poison(monkeypatch, {6}, "gradients")
    train(toy_ddpm_config(tmp_path / "six", max_steps=6, ema_decay=None, max_nonfinite_skips=1))
    assert_same_weights(exported(tmp_path / "six"), exported(tmp_path / "five"))


def test_more_nonfinite_steps_than_allowed_stop_naming_the_step(tmp_path, monkeypatch):
    poison(monkeypatch, {3, 5}, "loss")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradients at step 5, 2 such steps, more than "
                                                 r"training\.max_nonfinite_skips=1; stopped without saving"):
        train(toy_ddpm_config(tmp_path / "run", max_steps=8, checkpointing_steps=2, max_nonfinite_skips=1))
    checkpoints = tmp_path / "run" / "ddpm" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert read_trainer_state(checkpoints / "checkpoint-4")["nonfinite_skips"] == 1


def test_the_skip_count_survives_a_resume(tmp_path, monkeypatch):
    def config(max_steps):
        return toy_ddpm_config(tmp_path / "run", max_steps=max_steps, checkpointing_steps=4,
                               resume_from_checkpoint="latest", max_nonfinite_skips=1)

    poison(monkeypatch, {3}, "loss")
    assert train(config(4))["ddpm"]["nonfinite_skips"] == 1
    poison(monkeypatch, {2}, "loss")  # step 6 of the resumed run: the second of the whole run
    with pytest.raises(NonFiniteLossError, match="at step 6, 2 such steps, more than training.max_nonfinite_skips=1"):
        train(config(8))


def test_without_skips_nonfinite_gradients_stop_training_naming_the_step(tmp_path, monkeypatch):
    poison(monkeypatch, {3}, "gradients")  # NaN weights after step 3: the loss of step 4 is NaN
    with pytest.raises(NonFiniteLossError, match=r"loss became nan by step 4; stopped without saving"):
        train(toy_ddpm_config(tmp_path / "run", max_steps=8, log_every=1))


def test_grad_scaler_skips_are_counted_and_logged(tmp_path, monkeypatch, caplog):
    """fp16's GradScaler on CPU (accelerate only builds one on GPUs): a step with NaN gradients is
    skipped by the scaler, which halves its scale; the loop counts each in logs and metrics."""
    scalers = []

    def accelerator_with_a_grad_scaler(config):
        accelerator = make_accelerator(config)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
        scalers.append(accelerator.scaler)
        return accelerator

    make_accelerator = run_module.make_accelerator
    monkeypatch.setattr(run_module, "make_accelerator", accelerator_with_a_grad_scaler)
    poison(monkeypatch, {3, 7}, "gradients")
    metrics = train(toy_ddpm_config(tmp_path / "run", max_steps=10, max_grad_norm=None))["ddpm"]
    assert metrics["grad_scaler_skips"] == 2 and "nonfinite_skips" not in metrics
    assert [h["grad_scaler_skips"] for h in history(tmp_path / "run")] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert scalers[0].get_scale() == 2.0 ** 8  # halved once per skipped step
    assert "non-finite" not in caplog.text  # the scaler's business, not a skip of ours


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and accelerate's grad scaler need a GPU; "
                    "test_grad_scaler_skips_are_counted_and_logged drives the same counting on CPU")
def test_fp16_on_a_gpu_counts_the_grad_scaler_skips(tmp_path, monkeypatch):
    poison(monkeypatch, {3}, "gradients")
    raw = toy_ddpm_config(tmp_path / "run", max_steps=6)
    raw.update(mixed_precision="fp16", device="auto")
    metrics = train(raw)["ddpm"]
    assert metrics["grad_scaler_skips"] >= 1
    assert history(tmp_path / "run")[-1]["grad_scaler_skips"] == metrics["grad_scaler_skips"]
