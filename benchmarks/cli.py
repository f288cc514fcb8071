"""`stagediff benchmark` (also `python scripts/benchmark.py`): what stage-2 training and sampling
cost on this machine, measured side by side in one run (issue 8). Prints a table, writes JSON.

1. Training throughput (images/s, the median of timed windows after a warm-up) of **our loop**
   against **a baseline loop** written as diffusers' examples write it, on the same UNet config,
   batch, data and precision (loops.py).
2. Latent vs pixel DDPM: our loop on the 8x8x4 latents and on the 32x32x1 pixels, same UNet.
3. Sampling: seconds per image and the metrics of `stagediff evaluate` for DDPM (all T steps),
   DDIM 50 and DPM-Solver++ 10 and 20 on a trained latent DDPM (`--ldm`; sampling.py).
4. Achieved FLOP/s of the training step (`torch.utils.flop_counter.FlopCounterMode`) against the
   fp32 (GPU: bf16) matmul peak measured in the same run, with where the step's time goes (flops.py).
5. The data pipeline's throughput against what the step consumes, and peak memory of each run
   (system.py).
6. The sharded latent cache (issue 17; data.py): peak memory and time to the first step of a
   training process at 10k, 100k and 1M cached latents, training from shards against an in-memory
   cache, and encoding with one process against two (`--data-only` runs this section alone).

Every precision asked for is measured (default: fp32 and bf16; the device's default precision,
fp32 on CPUs and bf16/fp16 on GPUs, is the headline), each in a process of its own (session.py).
Run one benchmark at a time: the runs time the whole machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from stagediff.modules.vae import make_autoencoder
from stagediff.pipelines.config import RunConfig, StageConfig
from stagediff.pipelines.data import load_data
from stagediff.pipelines.registry import load_config
from stagediff.pipelines.sampling import pick_device
from stagediff.pipelines.stage_folder import DONE_FILE

from .data import DEFAULT_ENCODE_ITEMS, DEFAULT_FOLDER_SIZES, DEFAULT_SIZES, format_data, measure_data
from .loops import PRECISIONS, SLOW_RUN_DIVISOR, Timing, _latent_shape
from .report import check_targets, format_report
from .sampling import measure_samplers
from .session import Session, in_fresh_process
from .system import machine_info

DEFAULT_CONFIG = "configs/mnist_ldm.yaml"


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
    parser.add_argument("--skip-data", action="store_true", help="skip the latent cache's data section (item 6)")
    parser.add_argument("--data-only", action="store_true", help="run the latent cache's data section (item 6) alone")
    parser.add_argument("--data-sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated numbers of cached latents for item 6 (default %(default)s)")
    parser.add_argument("--folder-sizes", default=",".join(map(str, DEFAULT_FOLDER_SIZES)),
                        help="comma-separated numbers of images in item 6's image folders (default %(default)s)")
    parser.add_argument("--encode-items", type=int, default=DEFAULT_ENCODE_ITEMS,
                        help="images encoded per run of item 6's encode comparison, a multiple of 4 (default "
                             "%(default)s: four shards)")
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
    if "training" in report:
        print(format_report(report))
    if "data" in report:
        print(format_data(report["data"]))
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
    device = pick_device(args.device)
    cpu = device.type == "cpu"
    precisions = resolve_precisions(args.precision, cpu)
    headline = precisions[0]
    config_path = _default_config_path(args.config)
    config = load_config(config_path, list(args.overrides))
    stage_cfg = _latent_ddpm_stage(config, args.stage)
    vae_stage = config.stage(stage_cfg.input)
    batch_size = args.batch_size or stage_cfg.training.batch_size
    data = load_data(config.data)
    timing = Timing(args.steps, args.warmup, args.repeats)
    report = {"machine": machine_info(device, threads),
              "settings": {"config": str(config_path), "overrides": list(args.overrides),
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

        def data_section() -> dict:  # 6. the sharded latent cache
            def numbers(text: str) -> list[int]:
                return [int(size) for size in text.split(",") if size.strip()]

            return measure_data(stage_cfg, _latent_shape(vae_stage_dir, data), data.sample_shape, vae_stage_dir,
                                tmp / "data", sizes=numbers(args.data_sizes), batch_size=batch_size,
                                timing=timing.shortened(), threads=threads, cpu=cpu,
                                folder_sizes=numbers(args.folder_sizes), encode_items=args.encode_items,
                                rounds=args.rounds, seed=config.seed)

        if args.data_only:
            report["data"] = data_section()
            return report

        def session(precision: str, timing: Timing, **what) -> dict:
            work_dir = tmp / (f"{precision}-compiled" if what.get("compile_backend") else precision)
            return in_fresh_process(Session(
                config=config, stage_name=stage_cfg.name, batch_size=batch_size, timing=timing, precision=precision,
                cpu=cpu, threads=threads, vae_stage_dir=vae_stage_dir, latent_cache=tmp / "latent-cache",
                work_dir=work_dir, **what))

        # 1. Ours vs the baseline on latents, per precision (and compiled, if asked); with the
        # headline precision, also 2. pixel space (same UNet), 4. FLOP/s and 5. the loaders.
        measured = {}
        for precision in precisions:
            if precision == headline:
                measured[precision] = session(precision, timing, rounds=args.rounds, headline=True,
                                              pixel=not args.skip_pixel)
            else:
                measured[precision] = session(precision, timing.shortened())
        compiled = session(headline, timing, compile_backend=args.compile)["ours"] if args.compile else None
        if not args.skip_data:
            report["data"] = data_section()

    training = {}
    for precision in precisions:
        training[f"ours_latent_{precision}"] = measured[precision]["ours"]
        training[f"baseline_latent_{precision}"] = measured[precision]["baseline"]
    if args.compile:
        training[f"ours_latent_{headline}_compiled"] = compiled
    if not args.skip_pixel:
        training[f"ours_pixel_{headline}"] = measured[headline]["pixel"]
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
    report["flops"] = measured[headline]["flops"]
    report["data_pipeline"] = measured[headline]["data_pipeline"]

    # 3. Samplers on a trained latent DDPM.
    ldm_dir = args.ldm or Path(config.output_dir) / stage_cfg.name
    if args.skip_sampling:
        report["sampling"] = {"skipped": "--skip-sampling"}
    elif not (ldm_dir / DONE_FILE).is_file():
        report["sampling"] = {"skipped": f"{ldm_dir} holds no trained stage (train it, or pass --ldm)"}
    else:
        report["sampling"] = measure_samplers(ldm_dir, args.n, args.seed, args.device, args.seeds)
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
    if (trained / DONE_FILE).is_file() and (trained / "vae" / "config.json").is_file():
        return trained, str(trained)
    cfg = vae_stage.model
    channels, resolution, _ = data.sample_shape
    torch.manual_seed(config.seed)
    vae = make_autoencoder(channels, resolution, cfg.block_out_channels, cfg.latent_channels, cfg.layers_per_block,
                           cfg.norm_num_groups)
    vae.save_pretrained(tmp / "vae" / "vae")
    return tmp / "vae", "fresh AutoencoderKL (untrained) of the config's shape"


def _ratio(a: dict, b: dict) -> float:
    return a["images_per_s"] / b["images_per_s"]


if __name__ == "__main__":
    main()
