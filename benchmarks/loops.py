"""The two training loops the benchmark times, on the same UNet config, batch, data and precision:

- **ours**: the real `trainer.train_stage` training the real `ddpm` stage (on cached latents, or
  on pixels for the latent-vs-pixel comparison);
- **the baseline**: written plainly below as diffusers'
  `examples/unconditional_image_generation/train_unconditional.py` does it (UNet2DModel +
  DDPMScheduler + AdamW + Accelerate + diffusers' EMAModel, `.item()` logging every step); in
  latent space it encodes every batch with the VAE, as `examples/text_to_image/train_text_to_image.py`
  does. Both read the same in-memory images (the example decodes and transforms each image at
  every step: left out, in the baseline's favour).

Each is timed over warm-up windows and then timed windows of optimizer steps (`Timing`); the
images/s of the timed windows' median is its result. Both take the Accelerator to run under (its
precision is the process's: see session.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stagediff.pipelines.config import RunConfig, StageConfig
from stagediff.pipelines.stage_folder import read_history
from stagediff.pipelines.stages.ddpm import BETA_SCHEDULES, DDPMStage
from stagediff.pipelines.trainer import LR_SCHEDULES, train_stage

from .system import peak_memory, sync

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # ours -> Accelerate's mixed_precision
SLOW_RUN_DIVISOR = 5  # pixel-space and non-default-precision runs time windows of steps / 5


@dataclasses.dataclass(frozen=True)
class Timing:
    """Warm-up steps (rounded up to whole windows), then `repeats` timed windows of `steps` optimizer steps."""

    steps: int
    warmup: int
    repeats: int

    @property
    def warmup_windows(self) -> int:
        return math.ceil(self.warmup / self.steps)

    @property
    def windows(self) -> int:
        return self.warmup_windows + self.repeats

    def shortened(self) -> Timing:
        """The timing of a slow run: windows of steps / SLOW_RUN_DIVISOR (at least 2) steps."""
        return dataclasses.replace(self, steps=max(2, self.steps // SLOW_RUN_DIVISOR))


def training_run(config: RunConfig, stage_cfg: StageConfig, batch_size: int, timing: Timing, precision: str,
                 output_dir: Path, pixel: bool = False) -> RunConfig:
    """A one-stage run of `stage_cfg` (on pixels, without its input VAE, if `pixel`) that trains
    the warm-up and timed windows, logging (and so timing) once per window, with no previews,
    validations or checkpoints in between."""
    stage = copy.deepcopy(stage_cfg)
    stage.training = dataclasses.replace(
        stage.training, max_steps=timing.windows * timing.steps, log_every=timing.steps, batch_size=batch_size,
        sample_every=None, eval_every=None, early_stopping_patience=None, checkpointing_steps=None,
        resume_from_checkpoint=None)
    if pixel:
        stage.input = None
    return dataclasses.replace(config, output_dir=str(output_dir), log_with="none", push_to_hub=False,
                               mixed_precision=PRECISIONS[precision], stages=[stage])


class ThroughputDDPMStage(DDPMStage):
    """The real ddpm stage in the real loop, less what is not timed: its latent cache is made
    before training (`cache_latents`, timed apart), and the work after the last step is only the
    validation loss (no sampling for metrics, previews or export)."""

    def cache_latents(self, accelerator: Accelerator, folder: Path) -> float:
        """Encode (or read back) the latent cache under `folder`; the seconds it took."""
        started = time.perf_counter()
        super().setup(accelerator, folder)
        return time.perf_counter() - started

    def setup(self, accelerator, stage_dir):
        pass  # done by cache_latents, before training

    def evaluate(self, model, loader, accelerator):
        return self.validate(model, loader, accelerator)

    def preview(self, model, batch):
        return torch.zeros(1, 1, 2, 2)

    def export(self, model, stage_dir):
        pass


def measure_our_loop(accelerator: Accelerator, run: RunConfig, data, vae_stage_dir: Path | None,
                     latent_cache: Path, precision: str, timing: Timing,
                     compile_backend: str | None = None) -> tuple[dict, object]:
    """`trainer.train_stage` on `run`'s one stage; the images/s it logs once per window are the
    timings. Returns the result and the data it trained on (the cached latents, or `data`).
    `compile_backend` names the dynamo backend `accelerator` was made with (None: none)."""
    stage_cfg = run.stages[0]
    stage = ThroughputDDPMStage(stage_cfg, data, vae_stage_dir)
    stage_dir = Path(run.output_dir) / stage_cfg.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    graphs_before = _compiled_graphs()
    cache_seconds = stage.cache_latents(accelerator, latent_cache)
    with peak_memory(accelerator.device) as memory:
        _, metrics = train_stage(accelerator, stage, run, stage_dir)
    history = read_history(stage_dir)
    windows = [h["images_per_s"] for h in history if "images_per_s" in h]
    result = summary(windows, timing, stage_cfg.training.batch_size, precision)
    result.update(loop="ours: trainer.train_stage, ddpm stage", space=stage.data.kind,
                  sample_shape=list(stage.data.sample_shape), first_loss=history[0]["loss"],
                  last_loss=history[-1]["loss"], val_loss=metrics["val_loss"], latent_cache_seconds=cache_seconds,
                  compile=compile_backend, compiled_graphs=_compiled_graphs() - graphs_before, **memory)
    return result, stage.data


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def baseline_loop(accelerator: Accelerator, unet_config: dict, dataset, batch_size: int, train_cfg, num_windows: int,
                  steps: int, vae: AutoencoderKL | None = None, num_train_timesteps: int = 1000,
                  beta_schedule: str = "linear") -> dict:
    """What diffusers' examples/unconditional_image_generation/train_unconditional.py does, step
    for step, on a UNet2DModel of `unet_config`; with `vae`, each batch is first encoded as
    examples/text_to_image/train_text_to_image.py does (a straightforward latent diffusion loop).

    Times `num_windows` windows of `steps` optimizer steps; returns the images/s of each window,
    the losses and the parameter change (to show that it trains)."""
    model = UNet2DModel(**unet_config)
    ema_model = EMAModel(model.parameters(), decay=train_cfg.ema_decay or 0.9999, use_ema_warmup=True,
                         inv_gamma=1.0, power=3 / 4, model_cls=UNet2DModel, model_config=model.config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate,
                                  betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                  weight_decay=train_cfg.adam_weight_decay, eps=train_cfg.adam_epsilon)
    train_dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=train_cfg.num_workers)
    lr_scheduler = get_scheduler(LR_SCHEDULES[train_cfg.lr_scheduler], optimizer=optimizer,
                                 num_warmup_steps=train_cfg.lr_warmup_steps, num_training_steps=num_windows * steps)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    ema_model.to(accelerator.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if vae is not None:
        vae.requires_grad_(False)
        vae.to(accelerator.device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    before = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]

    windows, losses, global_step = [], [], 0
    images, started = 0, time.perf_counter()
    progress_bar = tqdm(total=num_windows * steps, disable=not accelerator.is_local_main_process, desc="baseline")
    model.train()
    while global_step < num_windows * steps:
        for batch in train_dataloader:
            clean_images = batch["x"].to(weight_dtype)
            if vae is not None:
                clean_images = vae.encode(clean_images).latent_dist.sample() * vae.config.scaling_factor
            # Sample noise that we'll add to the images
            noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=clean_images.device)
            bsz = clean_images.shape[0]
            # Sample a random timestep for each image
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=clean_images.device).long()
            # Add noise to the clean images according to the noise magnitude at each timestep
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                # Predict the noise residual
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                ema_model.step(model.parameters())
                progress_bar.update(1)
                global_step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step,
                    "ema_decay": ema_model.cur_decay_value}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)

            losses.append(logs["loss"])
            images += bsz * accelerator.num_processes
            if global_step % steps == 0:
                sync(accelerator.device)
                now = time.perf_counter()
                windows.append(images / (now - started))
                images, started = 0, now
            if global_step >= num_windows * steps:
                break
    progress_bar.close()
    change = sum((p.detach().float() - b.float()).abs().sum().item()
                 for p, b in zip(accelerator.unwrap_model(model).parameters(), before))
    return {"windows": windows, "losses": losses, "parameter_change_l1": change}


def measure_baseline_loop(accelerator: Accelerator, run: RunConfig, data, vae_stage_dir: Path, precision: str,
                          timing: Timing) -> dict:
    """`baseline_loop` with `run`'s one stage's UNet config, training settings and seed."""
    stage_cfg = run.stages[0]
    # The example accumulates no gradients; the trainer may have set the accelerator to.
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = 1
    # The same UNet2DModel config as ours (built by the stage), on the same pixels, encoded each step.
    latent_shape = _latent_shape(vae_stage_dir, data)
    unet_config = dict(stage_cfg.model.make_unet(latent_shape[1], latent_shape[0], latent_shape[0]).config)
    vae = AutoencoderKL.from_pretrained(vae_stage_dir / "vae")
    torch.manual_seed(run.seed)
    with peak_memory(accelerator.device) as memory:
        out = baseline_loop(accelerator, unet_config, data.train, stage_cfg.training.batch_size, stage_cfg.training,
                            timing.windows, timing.steps, vae, stage_cfg.model.num_train_timesteps,
                            BETA_SCHEDULES[stage_cfg.model.beta_schedule])
    result = summary(out["windows"], timing, stage_cfg.training.batch_size, precision)
    result.update(loop="baseline: diffusers train_unconditional.py + VAE encode per step", space="latent",
                  sample_shape=list(latent_shape), first_loss=out["losses"][0], last_loss=out["losses"][-1],
                  parameter_change_l1=out["parameter_change_l1"], **memory)
    return result


def _latent_shape(vae_stage_dir: Path, data) -> tuple[int, int, int]:
    vae = AutoencoderKL.load_config(vae_stage_dir / "vae")
    size = data.sample_shape[1] // 2 ** (len(vae["block_out_channels"]) - 1)
    return vae["latent_channels"], size, size


def summary(windows: list[float], timing: Timing, batch_size: int, precision: str) -> dict:
    """The median images/s of the timed windows (the last window if warm-up took them all)."""
    timed = windows[timing.warmup_windows:] or windows[-1:]
    return {"images_per_s": statistics.median(timed), "window_images_per_s": timed,
            "warmup_images_per_s": windows[: timing.warmup_windows], "steps_per_window": timing.steps,
            "batch_size": batch_size, "precision": precision}
