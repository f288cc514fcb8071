"""The one training loop: every stage kind trains here, on Accelerate.

Reads top to bottom: data loaders, model, optimizer and schedule, `prepare`, resume, the
`accumulate` loop (loss, backward, clip, step, EMA), logging, previews and checkpoints, then
evaluation, export and metrics. A stage kind only supplies the training module and what to
evaluate, preview and export (stages/base.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import gather_object, send_to_device, set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..modules.ema import EMA
from .checkpoint import read_trainer_state, resolve_checkpoint, save_checkpoint
from .config import RunConfig, save_config
from .data import BadImageTally, StreamBatches, StreamingImages, augment
from .images import save_grid
from .stage_folder import CHECKPOINTS_DIR, CONFIG_FILE, HISTORY_FILE, METRICS_FILE, SAMPLES_FILE
from .stages.base import Stage

logger = logging.getLogger(__name__)

LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # ours -> diffusers' names
DATA_STATE = "data_state.json"  # in a checkpoint: a stream's position and the unreadable images met


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class Phase:
    """One named parameter group of a stage (`Stage.parameter_groups`) with the optimizer and
    learning-rate schedule that step it: most stages have one ("model"), a GAN two
    ("discriminator", then "generator"), each with its own loss."""

    name: str
    params: list[torch.nn.Parameter]
    optimizer: AcceleratedOptimizer
    lr_scheduler: AcceleratedScheduler


def train_stage(accelerator: Accelerator, stage: Stage, run: RunConfig, stage_dir: Path,
                on_checkpoint: Callable[[torch.nn.Module, int], None] | None = None,
                ) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train one stage into `stage_dir`; return the final model (EMA weights, if any, for the
    stage's `ema_parameters`; on every process) and its validation metrics. `on_checkpoint(model,
    step)` runs on the main process after each checkpoint is saved, with the weights that would be
    exported (e.g. to push them)."""
    cfg = stage.config.training
    name = stage.config.name
    checkpoints_dir = stage_dir / CHECKPOINTS_DIR
    # One Accelerator serves every stage of a run: forget the stages before, so that this stage's
    # checkpoints hold its own model and optimizers only (a resume may skip the stages before).
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    stage.setup(accelerator, stage_dir)
    augment_images = stage.data.kind == "image"

    # Data. The seeded sampler reshuffles per epoch from (seed, epoch) alone, and the loader's own
    # generator keeps it from drawing on the global RNG, so resuming replays the same batches. A
    # stream (data.streaming) is read in shuffled blocks, each process its share, and resumes from
    # the position its checkpoint saved.
    loading = _loader_options(cfg, accelerator)
    if isinstance(stage.data.train, StreamingImages):
        train_loader = StreamBatches(stage.data.train, cfg.batch_size, accelerator.process_index,
                                     accelerator.num_processes, run.seed, threads=cfg.num_workers,
                                     pin_memory=loading["pin_memory"])
    else:
        train_loader = DataLoader(stage.data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(run.seed), **loading)
        if len(train_loader) // accelerator.num_processes < 1:
            raise ValueError(f"stages.{name}.training.batch_size: {cfg.batch_size} x {accelerator.num_processes} "
                             f"process(es) is larger than the {len(stage.data.train)} training examples")
    val_loader = DataLoader(stage.data.validation, batch_size=cfg.batch_size, **loading)
    data_progress = _DataProgress(accelerator, train_loader, stage, run)

    # Model: identical initial weights on every process; noise streams differ per process below.
    set_seed(run.seed)
    model = stage.build_model()
    ema = EMA(model, cfg.ema_decay, stage.ema_parameters(model)) if cfg.ema_decay else None
    # One optimizer and schedule per named parameter group (one for most stages; a GAN has two).
    groups = stage.parameter_groups(model)
    # Fused AdamW: one kernel for all parameters (the demo UNet's update on a CPU: 1.6 ms, foreach
    # 6.3 ms, a loop 7.8 ms). foreach under fp16, where Accelerate sees the grad scaler's skipped
    # steps only for optimizers that do not take the scaler's inf check themselves (fused ones do).
    fused = accelerator.scaler is None and accelerator.device.type in ("cpu", "cuda")
    optimizers = [torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                    **({"fused": True} if fused else {"foreach": True}))
                  for params in groups.values()]
    # One schedule step per optimizer step, whatever the number of processes (`split_batches`
    # below; accelerate's default, as in diffusers' examples, steps it once per process with
    # lengths scaled to match), so a checkpoint resumes at the right learning rate with another
    # process count. A group steps only where `stage.phase_due` says (a GAN's generator every
    # n_critic-th step), so its schedule counts its own optimizer steps: each cosine reaches 0 at the
    # last training step (a schedule of max_steps left a generator with n_critic 2 at half its
    # learning rate), and each warm-up lasts lr_warmup_steps of the group's own optimizer steps.
    schedulers = [get_scheduler(LR_SCHEDULES[cfg.lr_scheduler], optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                num_training_steps=_optimizer_steps(stage, name, cfg.max_steps))
                  for name, optimizer in zip(groups, optimizers)]
    model, train_loader, val_loader, *prepared = accelerator.prepare(
        model, train_loader, val_loader, *optimizers, *schedulers)
    phases = [Phase(name, params, optimizer, lr_scheduler) for (name, params), optimizer, lr_scheduler
              in zip(groups.items(), prepared[: len(groups)], prepared[len(groups):])]
    for phase in phases:
        phase.lr_scheduler.split_batches = True
    if ema is not None:
        ema.to(accelerator.device)
    set_seed(run.seed, device_specific=True)

    step = grad_scaler_skips = 0
    stopper = _EarlyStopping(stage.monitor, cfg.early_stopping_patience)
    nonfinite = _NonFiniteSteps(accelerator, cfg.max_nonfinite_skips, name, checkpoints_dir)
    checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, checkpoints_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))  # model, optimizer, schedule, RNG states
        state = read_trainer_state(checkpoint)
        step, grad_scaler_skips, nonfinite.skipped = state["step"], state["grad_scaler_skips"], state["nonfinite_skips"]
        if ema is not None:
            ema.load_state_dict(load_file(checkpoint / "ema.safetensors"))
        stopper.load(state, checkpoint)
        data_progress.load(checkpoint)
        accelerator.print(f"[{name}] resumed from {checkpoint} at step {step}")
    if accelerator.is_main_process:
        _truncate_history(stage_dir / HISTORY_FILE, step)

    def write_checkpoint_extras(folder: Path) -> None:
        save_config(run, folder / CONFIG_FILE)
        if ema is not None:
            save_file(ema.state_dict(), folder / "ema.safetensors")
        stopper.save(folder)
        data_progress.write(folder)

    preview_batch = torch.stack([stage.data.validation[i]["x"] for i in range(min(16, len(stage.data.validation)))])
    images_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    # The learning rate is never scaled with the batch: say so (accelerator.print: main process only).
    accelerator.print(f"[{name}] effective batch {images_per_step} = {cfg.batch_size} per process x "
                      f"{cfg.gradient_accumulation_steps} accumulation step(s) x {accelerator.num_processes} "
                      f"process(es) on {accelerator.device.type}; lr {cfg.learning_rate:g} as configured "
                      f"(not scaled with the {accelerator.num_processes} process(es))")
    batches = _endless_batches(train_loader, accelerator, first_batch=step * cfg.gradient_accumulation_steps)
    progress = tqdm(total=cfg.max_steps, initial=step, desc=name, disable=not accelerator.is_local_main_process)
    meter = _LossMeter(accelerator)
    started = time.perf_counter()
    model.train()
    step_finite = True  # False once a micro-batch of the current step has a non-finite loss or gradients
    while step < cfg.max_steps:
        batch = next(batches)
        data_progress.add(batch)
        with accelerator.accumulate(model):
            x = stage.training_input(augment(batch["x"], run.data) if augment_images else batch["x"])
            conditioning = stage.conditioning(batch["label"])  # {} unless the stage is class-conditional
            for phase in phases:
                if not stage.phase_due(phase.name, step + 1):
                    continue
                terms = model(x, **conditioning) if len(phases) == 1 else model(x, phase=phase.name, **conditioning)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(phase.params, cfg.max_grad_norm)
                step_finite = step_finite and nonfinite.check(terms["loss"], phase.params)
                if step_finite:
                    phase.optimizer.step()
                    phase.lr_scheduler.step()
                    grad_scaler_skips += phase.optimizer.step_was_skipped  # fp16: the scaler saw inf/NaN gradients
                    meter.add(terms if len(phases) == 1 else {f"{phase.name}_{k}": v for k, v in terms.items()})
                # Every group's gradients: a generator's loss leaves some on the discriminator too.
                for each in phases:
                    each.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if not step_finite:
            nonfinite.skip(step)  # raises past training.max_nonfinite_skips
            step_finite = True
        meter.steps += 1
        progress.update(1)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            logs = meter.flush(step, name, checkpoints_dir)  # raises NonFiniteLossError
            logs.update(data_progress.merge())  # raises past data.max_bad_fraction
            logs["images_per_s"] = images_per_step * logs.pop("steps") / logs.pop("seconds")  # all processes
            logs["images_per_s_per_process"] = logs["images_per_s"] / accelerator.num_processes
            logs["lr"] = phases[0].lr_scheduler.get_last_lr()[0]
            logs.update(_skip_counts(accelerator, nonfinite, grad_scaler_skips))
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")}
                                 | {"img_s": f"{logs['images_per_s']:.0f}"})
            accelerator.log({f"{name}/{k}": v for k, v in logs.items()}, step=step)
            if accelerator.is_main_process:
                with open(stage_dir / HISTORY_FILE, "a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
        if cfg.eval_every and step % cfg.eval_every == 0:
            model.eval()
            with isolated_rng(run.seed):
                val = stage.validate(_eval_model(accelerator, model, ema), val_loader, accelerator)
            model.train()
            accelerator.log({f"{name}/val/{k}": v for k, v in val.items()}, step=step)
            if accelerator.is_main_process:
                with open(stage_dir / HISTORY_FILE, "a") as f:
                    f.write(json.dumps({"step": step, **{f"val/{k}": v for k, v in val.items()}}) + "\n")
            if stage.monitor is not None and stopper.update(val, step, _eval_model(accelerator, model, ema)):
                accelerator.print(f"[{name}] early stopping at step {step}: validation {stage.monitor} has not "
                                  f"improved for {cfg.early_stopping_patience} validations; best "
                                  f"{stopper.best:.6g} at step {stopper.best_step}")
                break
        if cfg.sample_every and step % cfg.sample_every == 0 and accelerator.is_main_process:
            _save_preview(stage, _eval_model(accelerator, model, ema), preview_batch, run.seed,
                          stage_dir / "samples" / f"step-{step:06d}.png")
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
            meter.flush(step, name, checkpoints_dir, keep=True)  # never checkpoint NaN weights
            data_progress.gather()  # every process's stream position, for write_checkpoint_extras
            save_checkpoint(accelerator, checkpoints_dir,
                            {"step": step, **stopper.state(), "nonfinite_skips": nonfinite.skipped,
                             "grad_scaler_skips": grad_scaler_skips},
                            write_checkpoint_extras, cfg.checkpoints_total_limit)
            if on_checkpoint is not None and accelerator.is_main_process:
                on_checkpoint(_eval_model(accelerator, model, ema), step)
    progress.close()
    train_seconds = time.perf_counter() - started

    final = _eval_model(accelerator, model, ema)
    stopper.restore_best(final)  # with early stopping, the best validated weights are the result
    final.eval()
    with isolated_rng(run.seed):
        metrics = stage.evaluate(final, val_loader, accelerator)
        metrics.update(stage.finalize(final, _ordered_loader(stage.data.train, cfg, accelerator), accelerator))
    metrics["train_seconds"] = train_seconds
    metrics.update(effective_batch_size=images_per_step, num_processes=accelerator.num_processes)
    metrics.update(_skip_counts(accelerator, nonfinite, grad_scaler_skips))
    metrics.update(data_progress.finish())  # the one warning on skipped unreadable images
    accelerator.log({f"{name}/val/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        stage.export(final, stage_dir)
        _save_preview(stage, final, preview_batch, run.seed, stage_dir / SAMPLES_FILE)
        (stage_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return final, metrics


def _optimizer_steps(stage: Stage, phase: str, max_steps: int) -> int:
    """How many times group `phase` steps in `max_steps` training steps (`Stage.phase_due`)."""
    return sum(stage.phase_due(phase, step) for step in range(1, max_steps + 1))


def _truncate_history(path: Path, step: int) -> None:
    """Keep the rows up to `step`: later ones were logged by a run that a resume (or a restart from
    scratch, step 0) replaces, and the resumed run logs those steps again."""
    if path.is_file():
        rows = path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if json.loads(row)["step"] <= step]
        if len(kept) < len(rows):
            partial = path.with_name(path.name + ".tmp")
            partial.write_text("".join(kept))
            partial.replace(path)  # a kill leaves the old history or the new one, never half of it


@contextmanager
def isolated_rng(seed: int):
    """Run a block with its own seeded RNG and restore the training stream afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _loader_options(cfg, accelerator: Accelerator) -> dict:
    """DataLoader keywords from training.num_workers, pin_memory, persistent_workers and
    prefetch_factor. Pinned memory only for a CUDA device; with it, prepared loaders copy batches
    to the device without blocking (Accelerate's `non_blocking`, set here for this stage)."""
    pin_memory = cfg.pin_memory and accelerator.device.type == "cuda"
    accelerator.dataloader_config.non_blocking = pin_memory
    workers = {"persistent_workers": cfg.persistent_workers, "prefetch_factor": cfg.prefetch_factor}
    return {"num_workers": cfg.num_workers, "pin_memory": pin_memory, **(workers if cfg.num_workers else {})}


def _endless_batches(loader, accelerator: Accelerator, first_batch: int):
    """Batches epoch after epoch, starting at `first_batch` (counted from the start of training).
    A stream is endless itself and starts where its state (`_DataProgress.load`) puts it."""
    if isinstance(loader, StreamBatches):
        for batch in loader:
            yield send_to_device(batch, accelerator.device, non_blocking=accelerator.non_blocking)
    epoch, skip = divmod(first_batch, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _ordered_loader(dataset, cfg, accelerator: Accelerator):
    return accelerator.prepare(DataLoader(dataset, batch_size=cfg.batch_size, **_loader_options(cfg, accelerator)))


class _DataProgress:
    """What training keeps of its data besides the step count, and saves with each checkpoint in
    DATA_STATE: a stream's position (data.streaming; every process's) and the unreadable images
    skipped so far (data.skip_bad_images, counted from the names batches carry, `BadImageTally`)."""

    def __init__(self, accelerator: Accelerator, loader, stage: Stage, run: RunConfig):
        self.accelerator, self.loader = accelerator, loader
        self.stream = isinstance(loader, StreamBatches)
        counted = run.data.skip_bad_images and stage.data.kind == "image"  # cached latents carry no names
        self.tally = BadImageTally.of(run.data, None if self.stream else len(stage.data.train)) if counted else None
        self.saved = {}

    def add(self, batch: dict) -> None:
        if self.tally is not None:
            self.tally.add(batch)

    def merge(self) -> dict[str, int]:
        """Combine every process's count and stop past data.max_bad_fraction (all processes call this);
        the count so far, for the logs."""
        if self.tally is None:
            return {}
        device = self.accelerator.device
        self.tally.merge(gather_object, lambda n: int(self.accelerator.reduce(torch.tensor(n, device=device), "sum")))
        self.tally.check()
        return {"bad_images": len(self.tally.names)}

    def gather(self) -> None:
        """Collect what the next checkpoint saves (all processes call this)."""
        self.merge()
        self.saved = {"bad_images": self.tally.state()} if self.tally is not None else {}
        if self.stream:
            self.saved["streams"] = gather_object([self.loader.state_dict()])  # in process order

    def write(self, folder: Path) -> None:
        if self.saved:
            (folder / DATA_STATE).write_text(json.dumps(self.saved))

    def load(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / DATA_STATE).read_text()) if (checkpoint / DATA_STATE).is_file() else {}
        if self.stream:
            if "streams" not in saved:
                raise ValueError(f"{checkpoint} holds no stream position ({DATA_STATE}): it was saved by a run "
                                 "that did not stream its data (data.streaming: false)")
            self.loader.load_state_dict(saved["streams"][self.accelerator.process_index])
        if self.tally is not None and "bad_images" in saved:
            self.tally.load(saved["bad_images"])

    def finish(self) -> dict[str, int]:
        """After the last step: the final check and the one warning (main process); the count."""
        if self.stream:
            self.loader.close()
        counts = self.merge()
        if self.tally is not None:
            self.tally.check(final=True)
            if self.accelerator.is_main_process:
                self.tally.warn()
        return counts


def _eval_model(accelerator: Accelerator, model, ema: EMA | None):
    return ema.averaged if ema is not None else accelerator.unwrap_model(model)


@torch.no_grad()
def _save_preview(stage: Stage, model, batch: torch.Tensor, seed: int, path: Path) -> None:
    was_training = model.training
    model.eval()
    with isolated_rng(seed):
        images = stage.preview(model, batch.to(next(model.parameters()).device))
    save_grid(images, path, nrow=8)
    model.train(was_training)


class _EarlyStopping:
    """Tracks the best validation value of `monitor` (lower is better) and the weights that had it.

    The best weights live in memory and in each checkpoint (`best.safetensors`), so a resumed run
    keeps them and its patience count.
    """

    def __init__(self, monitor: str, patience: int | None):
        self.monitor, self.patience = monitor, patience
        self.best, self.best_step, self.bad_validations, self.best_weights = math.inf, None, 0, None

    def update(self, metrics: dict[str, float], step: int, model: torch.nn.Module) -> bool:
        """Record a validation; True when patience has run out."""
        value = metrics[self.monitor]
        if value < self.best:
            self.best, self.best_step, self.bad_validations = value, step, 0
            self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_validations += 1
        return self.patience is not None and self.bad_validations >= self.patience

    def restore_best(self, model: torch.nn.Module) -> None:
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights)

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_validations": self.bad_validations}

    def save(self, folder: Path) -> None:
        if self.best_weights is not None:
            save_file({k: v.contiguous() for k, v in self.best_weights.items()}, folder / "best.safetensors")

    def load(self, state: dict, checkpoint: Path) -> None:
        self.best, self.best_step = state.get("best", math.inf), state.get("best_step")
        self.bad_validations = state.get("bad_validations", 0)
        if (checkpoint / "best.safetensors").is_file():
            self.best_weights = load_file(checkpoint / "best.safetensors")


def _skip_counts(accelerator: Accelerator, nonfinite: _NonFiniteSteps, grad_scaler_skips: int) -> dict[str, int]:
    """The skipped-step counters that apply to this run, for logs and metrics."""
    counts = {"nonfinite_skips": nonfinite.skipped} if nonfinite.max_skips else {}
    if accelerator.scaler is not None:
        counts["grad_scaler_skips"] = grad_scaler_skips
    return counts


def _nonfinite_advice(checkpoints_dir: Path) -> str:
    return ("stopped without saving. "
            f"The last good checkpoint (if any) is the newest under {checkpoints_dir}; "
            "resume with training.resume_from_checkpoint=latest and a lower learning rate")


class _NonFiniteSteps:
    """Skips up to `max_skips` optimizer steps whose loss or gradients are NaN/inf
    (`training.max_nonfinite_skips`), logging each, and stops past that naming the step.

    Checking costs a host sync per step, so it only runs when skips are allowed; otherwise a
    non-finite loss stops training at the next log (`_LossMeter.flush`). Under fp16 the grad scaler
    owns overflowing gradients (it skips those steps itself, counted apart), so only the loss is checked.
    """

    def __init__(self, accelerator: Accelerator, max_skips: int, stage_name: str, checkpoints_dir: Path):
        self.accelerator, self.max_skips = accelerator, max_skips
        self.stage_name, self.checkpoints_dir = stage_name, checkpoints_dir
        self.skipped = 0

    def check(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> bool:
        """Whether this micro-batch's loss (and, once they are synced, the gradients) are finite on every process."""
        if not self.max_skips:
            return True
        bad = ~torch.isfinite(loss.detach()).all()
        if self.accelerator.sync_gradients and self.accelerator.scaler is None:
            for param in params:
                if param.grad is not None:
                    bad |= ~torch.isfinite(param.grad).all()
        return self.accelerator.reduce(bad.float(), reduction="sum").item() == 0

    def skip(self, step: int) -> None:
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise NonFiniteLossError(
                f"stage {self.stage_name!r}: non-finite loss or gradients at step {step}, {self.skipped} such steps, "
                f"more than training.max_nonfinite_skips={self.max_skips}; {_nonfinite_advice(self.checkpoints_dir)}")
        if self.accelerator.is_main_process:
            logger.warning("[%s] step %d: non-finite loss or gradients; update skipped (%d of at most %d, "
                           "training.max_nonfinite_skips)", self.stage_name, step, self.skipped, self.max_skips)


class _LossMeter:
    """Sums loss terms on the device and syncs with the host only when logging, so steps never
    wait on `.item()`; a NaN anywhere in the window makes the sum NaN and is caught then."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._reset()

    def _reset(self):
        self.sums, self.counts, self.steps, self.started = {}, {}, 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, step: int, stage_name: str, checkpoints_dir: Path, keep: bool = False) -> dict[str, float]:
        keys = list(self.sums)  # none when every step since the last flush was skipped
        means = (torch.stack([self.sums[k] / self.counts[k] for k in keys]) if keys
                 else torch.zeros(0, device=self.accelerator.device))
        logs = dict(zip(keys, self.accelerator.reduce(means, reduction="mean").tolist()))
        broken = {k: v for k, v in logs.items() if k.endswith("loss") and not math.isfinite(v)}
        if broken:
            raise NonFiniteLossError(
                f"stage {stage_name!r}: {', '.join(f'{k} became {v}' for k, v in broken.items())} by step {step}; "
                f"{_nonfinite_advice(checkpoints_dir)}")
        logs.update(steps=self.steps, seconds=time.perf_counter() - self.started)
        if not keep:
            self._reset()
        return logs
