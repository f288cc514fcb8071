"""`stagediff benchmark` (also `python scripts/benchmark.py`): what stage-2 training and sampling
cost on this machine, measured side by side in one run (issue 8). Prints a table, writes JSON.

1. Training throughput (images/s, the median of timed windows after a warm-up) of **our loop**,
   the real `trainer.train_stage` training the real `ddpm` stage on cached latents, against **a
   baseline loop** written plainly below as diffusers'
   `examples/unconditional_image_generation/train_unconditional.py` does it (UNet2DModel +
   DDPMScheduler + AdamW + Accelerate + diffusers' EMAModel, `.item()` logging every step), on the
   same UNet config, batch, data and precision; in latent space the baseline encodes every batch
   with the VAE, as `examples/text_to_image/train_text_to_image.py` does. Both read the same
   in-memory images (the example decodes and transforms each image at every step: left out, in
   the baseline's favour).
2. Latent vs pixel DDPM: our loop on the 8x8x4 latents and on the 32x32x1 pixels, same UNet.
3. Sampling: seconds per image and the metrics of `stagediff evaluate` for DDPM (all T steps),
   DDIM 50 and DPM-Solver++ 10 and 20 on a trained latent DDPM (`--ldm`).
4. Achieved FLOP/s of the training step (`torch.utils.flop_counter.FlopCounterMode`) against the
   fp32 (GPU: bf16) matmul peak measured in the same run, with where the step's time goes.
5. The data pipeline's throughput against what the step consumes, and peak memory of each run.

Every precision asked for is measured (default: fp32 and bf16; the device's default precision,
fp32 on CPUs and bf16/fp16 on GPUs, is the headline). Run it as one process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from tqdm.auto import tqdm

from ..modules.vae import make_autoencoder
from .config import RunConfig, StageConfig, load_config
from .data import load_data
from .latents import decode_latents
from .stages.ddpm import DDPMStage
from .trainer import LR_SCHEDULES, train_stage

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # ours -> Accelerate's mixed_precision
DEFAULT_CONFIG = "configs/mnist_ldm.yaml"
SAMPLERS = [("ddpm", None), ("ddim", 50), ("dpmsolver", 10), ("dpmsolver", 20)]  # None: all T steps
SLOW_RUN_DIVISOR = 5  # pixel-space and non-default-precision runs time windows of steps / 5


# ----------------------------------------------------------------------------- command line


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"run config whose latent ddpm stage (and its VAE stage) is measured "
                             f"(default {DEFAULT_CONFIG}, the embedded-MNIST demo)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for train")
    parser.add_argument("--stage", default=None, help="the ddpm stage to measure (default: the config's first "
                                                      "ddpm stage with an input VAE)")
    parser.add_argument("--steps", type=int, default=50,
                        help="optimizer steps per timed window (default 50; pixel-space runs and precisions other "
                             f"than the device's default use steps/{SLOW_RUN_DIVISOR}, at least 2)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="warm-up steps before the timed windows, rounded up to whole windows (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported (default 5)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of ours then the baseline at the headline precision; each reports its best round "
                             "(default 2: a round disturbed by other work on the machine does not decide)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of every training run (default: the stage's training.batch_size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default, usually the physical cores)")
    parser.add_argument("--precision", default="auto",
                        help="comma-separated fp32, bf16, fp16 (default auto: fp32,bf16 on CPUs, where fp32 is "
                             "the default; bf16 (else fp16),fp32 on GPUs); the first is the headline")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="also measure our loop with the model torch.compile'd through Accelerate's "
                             "dynamo_backend (default backend inductor; slow to warm up on CPUs)")
    parser.add_argument("--vae", type=Path, default=None,
                        help="a trained VAE stage folder (holding vae/), e.g. runs/mnist_ldm/vae (default: the "
                             "config's, when trained; else a fresh AutoencoderKL of the config's shape)")
    parser.add_argument("--ldm", type=Path, default=None,
                        help="a trained latent DDPM stage folder for the sampler comparison, e.g. "
                             "runs/mnist_ldm/ldm (default: the config's, when trained; else sampling is skipped)")
    parser.add_argument("--skip-sampling", action="store_true", help="skip the sampler comparison (item 3)")
    parser.add_argument("--skip-pixel", action="store_true", help="skip the pixel-space run (item 2)")
    parser.add_argument("--n", type=int, default=500, help="samples per sampler (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="sample with seeds seed..seed+K-1 and average, as evaluate --seeds (default 1; at 500 "
                             "samples the FD of one seed varies by about 15%%)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"), help="the JSON report (default "
                                                                                 "benchmark.json)")


def benchmark_command(args: argparse.Namespace) -> dict:
    report = run_benchmark(args)
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="stagediff benchmark", description=" ".join(__doc__.split("\n\n")[0].split()))
    add_benchmark_arguments(parser)
    return benchmark_command(parser.parse_args(argv))


# ----------------------------------------------------------------------------- the whole benchmark


def run_benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    precisions = resolve_precisions(args.precision, cpu)
    headline = precisions[0]
    config = load_config(_default_config_path(args.config), list(args.overrides))
    stage_cfg = _latent_ddpm_stage(config, args.stage)
    vae_stage = config.stage(stage_cfg.input)
    batch_size = args.batch_size or stage_cfg.training.batch_size
    data = load_data(config.data)
    report = {"machine": machine_info(device, threads),
              "settings": {"config": str(_default_config_path(args.config)), "overrides": list(args.overrides),
                           "stage": stage_cfg.name, "batch_size": batch_size, "steps_per_window": args.steps,
                           "warmup_steps": args.warmup, "windows": args.repeats, "rounds": args.rounds,
                           "precisions": precisions,
                           "headline_precision": headline, "compile": args.compile,
                           "unet": stage_cfg.model.block_out_channels,
                           "data": data.description}}

    with tempfile.TemporaryDirectory(prefix="stagediff-benchmark-") as tmp:
        tmp = Path(tmp)
        vae_stage_dir, vae_origin = _vae_stage_dir(args.vae, config, vae_stage, data, tmp)
        report["settings"]["vae"] = vae_origin

        # 1. Ours vs the baseline, per precision (and compiled, if asked), on latents.
        training, latent_data = {}, None
        for precision in precisions:
            steps = args.steps if precision == headline else max(2, args.steps // SLOW_RUN_DIVISOR)
            rounds = {"ours": [], "baseline": []}
            for index in range(args.rounds if precision == headline else 1):  # alternate: ours, baseline, ...
                run = _with_training(config, stage_cfg, batch_size, steps, args, precision,
                                     tmp / f"ours-{precision}-{index}")
                ours, latent_data = measure_our_loop(run, stage_cfg.name, data, vae_stage_dir, precision, cpu,
                                                     steps, args)
                rounds["ours"].append(ours)
                rounds["baseline"].append(measure_baseline_loop(run, stage_cfg.name, data, vae_stage_dir, precision,
                                                                cpu, steps, args))
            for loop, results in rounds.items():
                training[f"{loop}_latent_{precision}"] = _best_round(results)
        if args.compile:
            run = _with_training(config, stage_cfg, batch_size, args.steps, args, headline, tmp / "ours-compiled")
            training[f"ours_latent_{headline}_compiled"], _ = measure_our_loop(
                run, stage_cfg.name, data, vae_stage_dir, headline, cpu, args.steps, args, compile_backend=args.compile)
        # 2. Pixel space, same UNet, headline precision.
        if not args.skip_pixel:
            steps = max(2, args.steps // SLOW_RUN_DIVISOR)
            run = _with_training(config, stage_cfg, batch_size, steps, args, headline, tmp / "ours-pixel")
            run.stages[0].input = None
            training[f"ours_pixel_{headline}"], _ = measure_our_loop(run, stage_cfg.name, data, None, headline, cpu,
                                                                     steps, args)
        report["training"] = training
        report["speedup_vs_baseline"] = {
            p: _ratio(training[f"ours_latent_{p}"], training[f"baseline_latent_{p}"]) for p in precisions}
        if args.compile:
            report["speedup_vs_baseline"][f"{headline}_compiled"] = _ratio(
                training[f"ours_latent_{headline}_compiled"], training[f"baseline_latent_{headline}"])
        if not args.skip_pixel:
            report["latent_vs_pixel"] = {
                "latent_images_per_s": training[f"ours_latent_{headline}"]["images_per_s"],
                "pixel_images_per_s": training[f"ours_pixel_{headline}"]["images_per_s"],
                "ratio": _ratio(training[f"ours_latent_{headline}"], training[f"ours_pixel_{headline}"])}

        # 4. FLOP/s of the headline training step against the matmul peak; where its time goes.
        stage = DDPMStage(stage_cfg, latent_data)
        report["flops"] = measure_flops(stage, batch_size, headline, device, training[f"ours_latent_{headline}"])
        # 5. The loaders against the step.
        accelerator = _accelerator(_with_training(config, stage_cfg, batch_size, 1, args, headline, tmp), cpu)
        report["data_pipeline"] = {
            "latent": measure_loader(accelerator, latent_data.train, batch_size, stage_cfg.training.num_workers,
                                     training[f"ours_latent_{headline}"]["images_per_s"]),
            "pixel": measure_loader(accelerator, data.train, batch_size, stage_cfg.training.num_workers,
                                    training.get(f"ours_pixel_{headline}", {}).get("images_per_s")),
        }
        AcceleratorState._reset_state(reset_partial_state=True)

    # 3. Samplers on a trained latent DDPM.
    ldm_dir = args.ldm or Path(config.output_dir) / stage_cfg.name
    if args.skip_sampling:
        report["sampling"] = {"skipped": "--skip-sampling"}
    elif not (ldm_dir / "done.json").is_file():
        report["sampling"] = {"skipped": f"{ldm_dir} holds no trained stage (train it, or pass --ldm)"}
    else:
        report["sampling"] = measure_samplers(ldm_dir, args.n, args.seed, args.device, args.seeds,
                                              loaded=(config.data, data))
    report["targets"] = check_targets(report)
    return report


def resolve_precisions(requested: str, cpu: bool) -> list[str]:
    if requested == "auto":
        if cpu:
            return ["fp32", "bf16"]  # fp32 first, the CPU default: bf16 autocast buys no speed there
        return ["bf16" if torch.cuda.is_bf16_supported() else "fp16", "fp32"]
    precisions = [p.strip() for p in requested.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"--precision: {requested!r} is not valid; expected auto or a comma-separated list of "
                         f"{', '.join(PRECISIONS)}")
    return list(dict.fromkeys(precisions))


def _default_config_path(config: str | None) -> Path:
    if config is not None:
        return Path(config)
    here = Path(DEFAULT_CONFIG)
    return here if here.is_file() else Path(__file__).resolve().parents[1] / DEFAULT_CONFIG


def _latent_ddpm_stage(config: RunConfig, name: str | None) -> StageConfig:
    if name is not None:
        stage = config.stage(name)
        if stage.kind != "ddpm" or stage.input is None:
            raise ValueError(f"--stage {name}: a ddpm stage with an input VAE stage is needed, it is a "
                             f"{stage.kind} stage with input {stage.input}")
        return stage
    for stage in config.stages:
        if stage.kind == "ddpm" and stage.input is not None and config.stage(stage.input).kind == "vae":
            return stage
    raise ValueError("the config has no ddpm stage trained on a vae stage's latents (input: <vae stage>)")


def _vae_stage_dir(requested: Path | None, config: RunConfig, vae_stage: StageConfig, data,
                   tmp: Path) -> tuple[Path, str]:
    """A VAE stage folder (holding vae/) to encode with: --vae, the config's trained one, or a fresh
    AutoencoderKL of the config's shape (throughput does not depend on the weights)."""
    if requested is not None:
        if not (requested / "vae" / "config.json").is_file():
            raise ValueError(f"--vae {requested}: not a trained VAE stage folder (no vae/config.json)")
        return requested, str(requested)
    trained = Path(config.output_dir) / vae_stage.name
    if (trained / "done.json").is_file() and (trained / "vae" / "config.json").is_file():
        return trained, str(trained)
    cfg = vae_stage.model
    channels, resolution, _ = data.sample_shape
    torch.manual_seed(config.seed)
    vae = make_autoencoder(channels, resolution, cfg.block_out_channels, cfg.latent_channels, cfg.layers_per_block,
                           cfg.norm_num_groups)
    vae.save_pretrained(tmp / "vae" / "vae")
    return tmp / "vae", "fresh AutoencoderKL (untrained) of the config's shape"


def _with_training(config: RunConfig, stage_cfg: StageConfig, batch_size: int, steps: int, args, precision: str,
                   output_dir: Path) -> RunConfig:
    """A one-stage run of `stage_cfg` that trains warm-up + timed windows of `steps` steps, logging
    (and so timing) once per window, with no previews, validations or checkpoints in between."""
    stage = copy.deepcopy(stage_cfg)
    windows = math.ceil(args.warmup / steps) + args.repeats
    stage.training = dataclasses.replace(
        stage.training, max_steps=windows * steps, log_every=steps, batch_size=batch_size, sample_every=None,
        eval_every=None, early_stopping_patience=None, checkpointing_steps=None, resume_from_checkpoint=None)
    return dataclasses.replace(config, output_dir=str(output_dir), log_with="none", push_to_hub=False,
                               mixed_precision=PRECISIONS[precision], stages=[stage])


def _accelerator(run: RunConfig, cpu: bool, compile_backend: str | None = None) -> Accelerator:
    """A fresh Accelerator as `run.make_accelerator` builds it (plus an optional dynamo backend)."""
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)  # precision is process-wide state
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision, cpu=cpu, dynamo_backend=(compile_backend or "no").upper(),
        project_config=ProjectConfiguration(project_dir=run.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed))
    torch.set_num_threads(threads)
    return accelerator


# ----------------------------------------------------------------------------- 1-2. training loops


class _ThroughputDDPMStage(DDPMStage):
    """The real ddpm stage in the real loop; only the work after the last step is cut down to the
    validation loss (no sampling for metrics, previews or export), which is not what is timed."""

    def evaluate(self, model, loader, accelerator):
        return self.validate(model, loader, accelerator)

    def preview(self, model, batch):
        return torch.zeros(1, 1, 2, 2)

    def export(self, model, stage_dir):
        pass


def measure_our_loop(run: RunConfig, stage_name: str, data, vae_stage_dir: Path | None, precision: str, cpu: bool,
                     steps: int, args, compile_backend: str | None = None) -> tuple[dict, object]:
    """`trainer.train_stage` on `run`'s stage; the images/s it logs once per window are the timings."""
    stage_cfg = run.stage(stage_name)
    accelerator = _accelerator(run, cpu, compile_backend)
    stage = _ThroughputDDPMStage(stage_cfg, data, vae_stage_dir)
    stage_dir = Path(run.output_dir) / stage_name
    stage_dir.mkdir(parents=True, exist_ok=True)
    graphs_before = _compiled_graphs()
    started = time.perf_counter()
    if vae_stage_dir is not None:  # encode the latent cache first (once per benchmark), timed apart
        stage.setup(accelerator, Path(run.output_dir).parent / "latent-cache")
        stage.setup = lambda accelerator, stage_dir: None
    cache_seconds = time.perf_counter() - started
    with peak_memory(accelerator.device) as memory:
        _, metrics = train_stage(accelerator, stage, run, stage_dir)
    history = [json.loads(line) for line in (stage_dir / "history.jsonl").read_text().splitlines()]
    windows = [h["images_per_s"] for h in history if "images_per_s" in h]
    result = _summary(windows, math.ceil(args.warmup / steps), steps, stage_cfg.training.batch_size, precision)
    result.update(loop="ours: trainer.train_stage, ddpm stage", space=stage.data.kind,
                  sample_shape=list(stage.data.sample_shape), first_loss=history[0]["loss"],
                  last_loss=history[-1]["loss"], val_loss=metrics["val_loss"], latent_cache_seconds=cache_seconds,
                  compile=compile_backend, compiled_graphs=_compiled_graphs() - graphs_before, **memory)
    AcceleratorState._reset_state(reset_partial_state=True)
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
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                windows.append(images / (now - started))
                images, started = 0, now
            if global_step >= num_windows * steps:
                break
    progress_bar.close()
    change = sum((p.detach().float() - b.float()).abs().sum().item()
                 for p, b in zip(accelerator.unwrap_model(model).parameters(), before))
    return {"windows": windows, "losses": losses, "parameter_change_l1": change}


def measure_baseline_loop(run: RunConfig, stage_name: str, data, vae_stage_dir: Path, precision: str, cpu: bool,
                          steps: int, args) -> dict:
    stage_cfg = run.stage(stage_name)
    accelerator = _accelerator(run, cpu)
    # The same UNet2DModel config as ours (built by the stage), on the same pixels, encoded each step.
    latent_shape = _latent_shape(vae_stage_dir, data)
    unet_config = dict(stage_cfg.model.make_unet(latent_shape[1], latent_shape[0], latent_shape[0]).config)
    vae = AutoencoderKL.from_pretrained(vae_stage_dir / "vae")
    warmup_windows = math.ceil(args.warmup / steps)
    torch.manual_seed(run.seed)
    with peak_memory(accelerator.device) as memory:
        out = baseline_loop(accelerator, unet_config, data.train, stage_cfg.training.batch_size, stage_cfg.training,
                            warmup_windows + args.repeats, steps, vae, stage_cfg.model.num_train_timesteps,
                            {"linear": "linear", "cosine": "squaredcos_cap_v2"}[stage_cfg.model.beta_schedule])
    result = _summary(out["windows"], warmup_windows, steps, stage_cfg.training.batch_size, precision)
    result.update(loop="baseline: diffusers train_unconditional.py + VAE encode per step", space="latent",
                  sample_shape=list(latent_shape), first_loss=out["losses"][0], last_loss=out["losses"][-1],
                  parameter_change_l1=out["parameter_change_l1"], **memory)
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def _latent_shape(vae_stage_dir: Path, data) -> tuple[int, int, int]:
    vae = AutoencoderKL.load_config(vae_stage_dir / "vae")
    size = data.sample_shape[1] // 2 ** (len(vae["block_out_channels"]) - 1)
    return vae["latent_channels"], size, size


def _summary(windows: list[float], warmup_windows: int, steps: int, batch_size: int, precision: str) -> dict:
    timed = windows[warmup_windows:] or windows[-1:]
    return {"images_per_s": statistics.median(timed), "window_images_per_s": timed,
            "warmup_images_per_s": windows[:warmup_windows], "steps_per_window": steps, "batch_size": batch_size,
            "precision": precision}


def _best_round(results: list[dict]) -> dict:
    """The round with the highest median (the one least disturbed by other work on the machine),
    with every round's median kept."""
    best = max(results, key=lambda r: r["images_per_s"])
    return {**best, "round_images_per_s": [r["images_per_s"] for r in results]}


def _ratio(a: dict, b: dict) -> float:
    return a["images_per_s"] / b["images_per_s"]


# ----------------------------------------------------------------------------- 3. samplers


def measure_samplers(ldm_dir: Path, n: int, seed: int, device: str | None, seeds: int = 1,
                     loaded: tuple | None = None) -> dict:
    """`stagediff evaluate`'s sampling and metrics (cli.generate + generation_metrics) per sampler,
    averaged over seeds seed..seed+seeds-1 as `evaluate --seeds` does (each seed's FD is kept).
    `loaded`: a (data config, its splits) pair already loaded, reused when the stage's data is that."""
    import yaml

    from .cli import generate, resolve_stage_dir  # cli imports this module
    from .config import parse_run_config
    from .evaluation import generation_metrics

    stage_dir, kind = resolve_stage_dir(ldm_dir)
    data_config = parse_run_config(yaml.safe_load((stage_dir / "config.yaml").read_text())).data
    data = loaded[1] if loaded is not None and loaded[0] == data_config else load_data(data_config)
    vae_dir = stage_dir / "vae" if (stage_dir / "vae").is_dir() else None
    results = []
    for sampler, steps in SAMPLERS:
        args = argparse.Namespace(n=n, batch_size=256, sampler=sampler, steps=steps, device=device)
        runs = []
        for each in range(seed, seed + seeds):
            started = time.perf_counter()
            samples = generate(args, stage_dir, kind, each)
            seconds = (time.perf_counter() - started) / len(samples)
            runs.append({"sampling_seconds_per_sample": seconds,
                         **generation_metrics(samples, data, device or samples.device, vae_dir)})
        mean = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
        if "fd" in mean:
            mean["fd_per_seed"] = [r["fd"] for r in runs]
        results.append({"sampler": sampler, "steps": steps, **mean})
    report = {"model_dir": str(stage_dir), "num_samples": n, "seeds": list(range(seed, seed + seeds)),
              "results": results}
    if vae_dir is not None:  # the VAE decoder's share, the same for every sampler
        unet = UNet2DModel.load_config(stage_dir / "unet")
        z = torch.randn(n, unet["in_channels"], unet["sample_size"], unet["sample_size"],
                        device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        started = time.perf_counter()
        decode_latents(vae_dir, z)
        decode = (time.perf_counter() - started) / n
        report["vae_decode_seconds_per_sample"] = decode
        for r in results:
            r["denoising_seconds_per_sample"] = r["sampling_seconds_per_sample"] - decode
    return report


# ----------------------------------------------------------------------------- 4. FLOP/s


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts the CUDA attention kernels; the CPU one is counted the same way.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """Floating-point operations (a multiply-add counts 2) of `fn()` and of each operator."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, sizes=(1024, 2048),
                repeats: int = 5) -> dict:
    """The best median FLOP/s of square matmuls on this device and thread count."""
    best, per_size = 0.0, {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds = _median_seconds(lambda: a @ b, device, repeats)
        per_size[n] = 2 * n ** 3 / seconds
        best = max(best, per_size[n])
    return {"flop_per_s": best, "per_size": per_size, "dtype": str(dtype).removeprefix("torch.")}


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


OP_KINDS = [  # (kind, substrings of profiler op names), first match wins
    ("convolution", ("conv", "cudnn")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "gemm")),
    ("attention", ("attention", "softmax")),
    ("normalization", ("norm",)),
    ("optimizer", ("adam", "foreach")),
]


def measure_flops(stage: DDPMStage, batch_size: int, precision: str, device: torch.device, ours: dict) -> dict:
    """FLOPs of one training step of `stage`'s module (forward + backward), the FLOP/s our loop
    reached with it, the matmul peak, and where a profiled step spends its time."""
    torch.manual_seed(0)
    model = stage.build_model().to(device).train()
    x = torch.stack([stage.data.train[i]["x"] for i in range(batch_size)]).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))

    def step():
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            loss = model(x)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    flops, per_op = count_flops(step)
    peak = matmul_peak(device, dtype or torch.float32, sizes=(1024, 2048) if device.type == "cpu" else (4096, 8192))
    achieved = flops * ours["images_per_s"] / batch_size
    breakdown, dense_seconds, step_seconds = _time_breakdown(step, device)
    dense_flops = sum(v for k, v in per_op.items() if "conv" in k or "mm" in k)
    return {
        "flop_per_step": flops, "flop_per_image": flops / batch_size, "flop_per_op": per_op,
        "achieved_flop_per_s": achieved, "matmul_peak": peak, "fraction_of_peak": achieved / peak["flop_per_s"],
        "profiled_step_seconds": step_seconds, "time_fraction_by_op_kind": breakdown,
        "dense_ops_fraction_of_peak": (dense_flops / dense_seconds / peak["flop_per_s"]) if dense_seconds else None,
        "precision": precision,
    }


def _time_breakdown(step, device: torch.device, steps: int = 3) -> tuple[dict[str, float], float, float]:
    """Share of a step's operator time per OP_KINDS kind (self time, device time on GPUs), the
    seconds per step in convolutions and matmuls, and the profiled seconds per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    _sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = (time.perf_counter() - started) / steps
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, keys in OP_KINDS if any(s.lower() in name for s in keys)), "elementwise and other")
        if not name.startswith("aten::") and kind == "elementwise and other":
            continue  # autograd and profiler bookkeeping frames: their children are counted
        totals[kind] = totals.get(kind, 0.0) + getattr(event, attribute, 0.0)
    total = sum(totals.values()) or 1.0
    dense_seconds = (totals.get("convolution", 0.0) + totals.get("matmul", 0.0)) / 1e6 / steps
    return {k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}, dense_seconds, wall


# ----------------------------------------------------------------------------- 5. data and memory


def measure_loader(accelerator: Accelerator, dataset, batch_size: int, num_workers: int,
                   step_images_per_s: float | None, batches: int = 100) -> dict:
    """Images/s of the trainer's DataLoader alone (same dataset, batch, shuffle, workers, and
    Accelerate's preparation, which puts batches on the device)."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                            num_workers=num_workers, generator=torch.Generator().manual_seed(0)))
    images, started, done = 0, time.perf_counter(), 0
    while done < batches:
        for batch in loader:
            images += len(batch["x"])
            done += 1
            if done >= batches:
                break
    rate = images / (time.perf_counter() - started)
    out = {"loader_images_per_s": rate, "num_workers": num_workers}
    if step_images_per_s:
        out.update(step_images_per_s=step_images_per_s, loader_to_step_ratio=rate / step_images_per_s,
                   loader_share_of_step_time=step_images_per_s / rate)
    return out


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak memory while the block runs, in MiB: the GPU's allocated peak on CUDA, else the peak
    resident set size of this process (sampled every 5 ms) and its rise over the start."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        return
    start = _rss_bytes()
    peak, stop = [start], threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes())
        out.update(peak_rss_mib=peak[0] / 2 ** 20, peak_rss_rise_mib=(peak[0] - start) / 2 ** 20)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the lifetime peak
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ----------------------------------------------------------------------------- report


def machine_info(device: torch.device, threads: int) -> dict:
    import accelerate
    import diffusers

    info = {"device": str(device), "platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def check_targets(report: dict) -> list[dict]:
    """Issue 8's targets, each with the measured value and whether it is met."""
    headline = report["settings"]["headline_precision"]
    targets = []

    def add(name, measured, target, met):
        targets.append({"target": name, "measured": measured, "goal": target, "met": bool(met)})

    speedups = report["speedup_vs_baseline"]
    add(f"our stage-2 loop vs the baseline loop ({headline})", speedups[headline], ">= 2x", speedups[headline] >= 2)
    if f"{headline}_compiled" in speedups:
        value = speedups[f"{headline}_compiled"]
        add(f"our stage-2 loop, torch.compile, vs the baseline loop ({headline})", value, ">= 2x", value >= 2)
    if "latent_vs_pixel" in report:
        ratio = report["latent_vs_pixel"]["ratio"]
        add("latent DDPM vs pixel DDPM images/s (same UNet)", ratio, ">= 8x", ratio >= 8)
    add("training step FLOP/s vs matmul peak", report["flops"]["fraction_of_peak"], ">= 0.40",
        report["flops"]["fraction_of_peak"] >= 0.4)
    latent_loader = report["data_pipeline"]["latent"]
    add("latent loader images/s vs the step's", latent_loader["loader_to_step_ratio"], "> 1 (never the bottleneck)",
        latent_loader["loader_to_step_ratio"] > 1)
    sampling = report.get("sampling", {}).get("results")
    if sampling:
        by = {(r["sampler"], r["steps"]): r for r in sampling}
        ddpm, dpm20 = by[("ddpm", None)], by[("dpmsolver", 20)]
        if "fd" in ddpm:
            add("DPM-Solver++ 20 FD vs DDPM-1000 FD", dpm20["fd"] / ddpm["fd"], "<= 1.10",
                dpm20["fd"] <= 1.1 * ddpm["fd"])
            add("DPM-Solver++ 20 classes covered vs DDPM-1000", dpm20["classes_covered"] - ddpm["classes_covered"],
                ">= 0", dpm20["classes_covered"] >= ddpm["classes_covered"])
        speed = ddpm["sampling_seconds_per_sample"] / dpm20["sampling_seconds_per_sample"]
        add("DDPM (all T) vs DPM-Solver++ 20 sampling time, VAE decoding included", speed, ">= 40x", speed >= 40)
        if "denoising_seconds_per_sample" in dpm20:
            speed = ddpm["denoising_seconds_per_sample"] / dpm20["denoising_seconds_per_sample"]
            add("DDPM (all T) vs DPM-Solver++ 20 sampling time, denoising only", speed, ">= 40x", speed >= 40)
    return targets


def format_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"stagediff benchmark: {m['device']} ({m['processor']}), {m['torch_threads']} torch threads, "
             f"torch {m['torch']}, load average at start {m['load_average_at_start']}",
             f"UNet {s['unet']}, batch {s['batch_size']}, {s['data']}, VAE: {s['vae']}", "",
             "| training loop | space | precision | images/s (median) | timed windows | peak memory, MiB (rise) |",
             "|---|---|---|---|---|---|"]
    for name, r in report["training"].items():
        memory = (f"{r['peak_gpu_memory_mib']:.0f} (GPU)" if "peak_gpu_memory_mib" in r
                  else f"{r['peak_rss_mib']:.0f} RSS (+{r['peak_rss_rise_mib']:.0f})")
        loop = r["loop"].split(":")[0] + (f" (compiled, {r['compile']})" if r.get("compile") else "")
        lines.append(f"| {loop} | {r['space']} {'x'.join(map(str, r['sample_shape']))} | {r['precision']} | "
                     f"{r['images_per_s']:.1f} | {len(r['window_images_per_s'])} x {r['steps_per_window']} steps"
                     + (f", best of rounds {', '.join(f'{v:.0f}' for v in r['round_images_per_s'])}"
                        if len(r.get("round_images_per_s", [])) > 1 else "") + f" | {memory} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for precision, value in report["speedup_vs_baseline"].items():
        lines.append(f"| ours / baseline, latent, {precision} | {value:.2f}x |")
    if "latent_vs_pixel" in report:
        lines.append(f"| latent / pixel DDPM images/s | {report['latent_vs_pixel']['ratio']:.2f}x |")
    f = report["flops"]
    lines.append(f"| training step: {f['flop_per_image'] / 1e6:.1f} MFLOP/image, achieved "
                 f"{f['achieved_flop_per_s'] / 1e9:.1f} GFLOP/s of a "
                 f"{f['matmul_peak']['flop_per_s'] / 1e9:.1f} GFLOP/s "
                 f"{f['matmul_peak']['dtype']} matmul peak | {100 * f['fraction_of_peak']:.0f}% |")
    if f["dense_ops_fraction_of_peak"] is not None:
        lines.append(f"| convolutions and matmuls alone, of the peak | {100 * f['dense_ops_fraction_of_peak']:.0f}% |")
    lines.append("| step time by op kind | " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                    f["time_fraction_by_op_kind"].items()) + " |")
    for space, d in report["data_pipeline"].items():
        if "loader_to_step_ratio" in d:
            lines.append(f"| {space} loader images/s / step images/s | {d['loader_images_per_s']:.0f} / "
                         f"{d['step_images_per_s']:.0f} = {d['loader_to_step_ratio']:.0f}x |")
    sampling = report.get("sampling", {})
    if sampling.get("results"):
        lines += ["", f"| sampler ({sampling['num_samples']} samples, seeds {sampling['seeds']}) | FD | "
                      "classes covered | class KL | seconds / image |", "|---|---|---|---|---|"]
        for r in sampling["results"]:
            steps = "all T" if r["steps"] is None else r["steps"]
            lines.append(f"| {r['sampler']} {steps} | {r.get('fd', float('nan')):.3g} | "
                         f"{r.get('classes_covered', float('nan')):g} | "
                         f"{r.get('class_kl', float('nan')):.3g} | {r['sampling_seconds_per_sample']:.4f} |")
        if "vae_decode_seconds_per_sample" in sampling:
            lines.append(f"| (of which VAE decoding) | | | | {sampling['vae_decode_seconds_per_sample']:.4f} |")
    elif "skipped" in sampling:
        lines.append(f"\nsampling skipped: {sampling['skipped']}")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']:.3g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
