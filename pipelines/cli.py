"""`stagediff` command line: train, sample, evaluate, super-resolve, push, study, report, compare,
benchmark. `scripts/*.py` call the same functions, so `accelerate launch scripts/train.py ...` and
`stagediff train ...` run the same job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import PartialState

from stagediff.benchmarks.cli import add_benchmark_arguments, benchmark_command

from .config import ConfigError
from .diffusion import SAMPLERS, class_labels_for
from .hub import HubError, push
from .images import class_rows, make_grid, save_grid, save_png, scatter_image, to_uint8
from .registry import load_config
from .report import format_guidance_sweep, plot_guidance_sweep, write_report
from .run import run
from .sampling import evaluate_generation, generate, resolve_stage_dir
from .stages.base import Stage
from .study import format_study, parse_variant, seed_study
from .super_resolve import DEFAULT_TILE, evaluate_super_resolution, find_regression_baseline, super_resolve_files
from .trainer import NonFiniteLossError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML run config, e.g. configs/mnist_vae.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides; stages are addressed by name, e.g. stages.vae.training.max_steps=100")
    parser.add_argument("--force-stage", action="append", default=[], metavar="NAME",
                        help="retrain this stage even if its outputs match the config (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="when output_dir holds another run (other seed, data or model), delete its stage "
                             "folders and train anew instead of stopping")


def train_command(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    run(config, force_stages=tuple(args.force_stage), overwrite=args.overwrite)


def add_sampling_arguments(parser: argparse.ArgumentParser, default_n: int) -> None:
    parser.add_argument("model_dir", type=Path, help="a trained stage folder (or a run folder: its last stage)")
    parser.add_argument("--n", type=int, default=default_n, help=f"number of samples (default {default_n})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                        help="diffusion sampler (default dpmsolver, i.e. DPM-Solver++); ddpm is the seed's "
                             "ancestral sampler with all T steps")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; ddpm: all T)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, default_n=64)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default MODEL_DIR/generated)")
    parser.add_argument("--class", dest="class_label", type=int, default=None, metavar="LABEL",
                        help="class-conditional models: draw this class, 0..K-1 (default: balanced classes, "
                             "a grid row per class)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="class-conditional models: classifier-free guidance w (default 1: no guidance)")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, default_n=2500)
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+K-1 and average")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the metrics as JSON to this file (--task sr: a folder, default MODEL_DIR/evaluation)")
    parser.add_argument("--task", choices=["generation", "sr"], default=None,
                        help="what to measure (default: sr for super-resolution stages, else generation)")
    parser.add_argument("--regression", type=Path, default=None,
                        help="--task sr: the L2 regression baseline's stage folder (default: a finished "
                             "`objective: regression` sr stage of the same run, if any)")
    parser.add_argument("--num-samples", type=int, default=3,
                        help="--task sr: samples per input, for the diversity and the figures (default 3)")
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[1.0], metavar="W",
                        help="class-conditional models: classifier-free guidance w (default 1: none); several "
                             "values sweep them: a table of FD against conditional accuracy, and with --out a "
                             "figure of it beside the JSON")


def sample_command(args: argparse.Namespace) -> None:
    stage_dir, stage_kind = resolve_stage_dir(args.model_dir)
    out = args.out or stage_dir / "generated"
    samples = generate(stage_dir, args.n, args.seed, sampler=args.sampler, steps=args.steps,
                       batch_size=args.batch_size, device=args.device, class_label=args.class_label,
                       guidance_scale=args.guidance_scale)
    if samples.dim() == 2:  # vectors: a scatter picture and the numbers
        save_grid(scatter_image(samples), out / "grid.png")
        out.joinpath("samples.csv").write_text("\n".join(",".join(f"{v:.6g}" for v in row) for row in samples.tolist()))
        print(f"wrote {len(samples)} samples to {out / 'samples.csv'} and a scatter plot to {out / 'grid.png'}")
        return
    num_classes = stage_kind.num_classes(stage_dir)
    if num_classes is not None and args.class_label is None:  # balanced classes: a row per class
        save_png(make_grid(*class_rows(samples, class_labels_for(num_classes, len(samples)))), out / "grid.png")
    else:
        save_grid(samples, out / "grid.png")
    for index, image in enumerate(to_uint8(samples)):
        save_png(image, out / f"{index:05d}.png")
    print(f"wrote {len(samples)} images and grid.png to {out}")


def evaluate_command(args: argparse.Namespace) -> None:
    """Sample, then score against the stage's own data (the metrics of pipelines/evaluation.py)."""
    stage_dir, stage_kind = resolve_stage_dir(args.model_dir)
    if (args.task or stage_kind.evaluation_task) == "sr":
        evaluate_sr_command(args, stage_dir, stage_kind)
        return
    reports = [evaluate_generation(stage_dir, args.n, list(range(args.seed, args.seed + args.seeds)),
                                   sampler=args.sampler, steps=args.steps, batch_size=args.batch_size,
                                   device=args.device, guidance_scale=w) for w in args.guidance_scale]
    text = json.dumps(reports[0] if len(reports) == 1 else reports, indent=2)
    print(text)
    if len(reports) > 1:
        print(format_guidance_sweep(reports))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        if len(reports) > 1:
            print(f"wrote {plot_guidance_sweep(reports, args.out.with_suffix('.png'))}")


def evaluate_sr_command(args: argparse.Namespace, stage_dir: Path, stage_kind: type[Stage]) -> None:
    if stage_kind.evaluation_task != "sr":
        raise ValueError(f"--task sr: {stage_dir} is a {stage_kind.kind} stage, not a super-resolution (sr) stage")
    regression = args.regression or find_regression_baseline(stage_dir)
    out = args.out or stage_dir / "evaluation"
    results = evaluate_super_resolution(stage_dir, regression, args.n, args.num_samples, args.sampler, args.steps,
                                        args.seed, args.device, out)
    keys = ["psnr", "ssim", "consistency_psnr", "swd", "diversity", "fd", "classes_covered", "seconds_per_image"]
    print("| method | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for method, metrics in results.items():
        print(f"| {method} | " + " | ".join(f"{metrics[k]:.4g}" if k in metrics else "" for k in keys) + " |")
    print(f"metrics and figures (input, bicubic, regression, samples, ground truth) in {out}")


def add_super_resolve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or glob patterns")
    parser.add_argument("--model", required=True, help="a trained sr stage folder or a hub id")
    parser.add_argument("--out", type=Path, required=True, help="output folder (PNGs named INPUT_xSCALE[_K].png)")
    parser.add_argument("--scale", type=int, default=None, help="must match the model's (default: the model's)")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                        help="diffusion sampler (default dpmsolver, i.e. DPM-Solver++)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; ddpm: all T)")
    parser.add_argument("--num-samples", type=int, default=1, help="plausible outputs per input (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="samples (tiled: tiles) per forward pass")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE,
                        help=f"inputs with a longer side run in overlapping tiles of this many input px a side, "
                             f"so memory does not grow with the input (default {DEFAULT_TILE}; 0: never tile)")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help="input px shared by neighbouring tiles, blended (default: a quarter of --tile)")
    parser.add_argument("--max-input-side", type=int, default=None,
                        help="longer inputs are first resized down to this many pixels (default: never)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


def super_resolve_command(args: argparse.Namespace) -> None:
    errors = super_resolve_files(args.inputs, args.model, args.out, args.scale, args.sampler, args.steps,
                                 args.num_samples, args.seed, args.batch_size, args.max_input_side, args.device,
                                 args.tile, args.tile_overlap)
    if errors:
        sys.exit(1)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config to repeat")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied to every variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[:key=value,...]",
                        help="a named set of overrides (repeatable; default: the config as it is)")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds 0..K-1 (default 5)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and study.json")
    parser.add_argument("--metrics", default="modes_covered,high_quality_fraction,train_seconds",
                        help="comma-separated metrics of the last stage to tabulate")


def study_command(args: argparse.Namespace) -> None:
    variants = dict(parse_variant(v) for v in args.variant) or {"config": []}
    results = seed_study(args.config, variants, args.seeds, args.out, args.overrides)
    print(format_study(results, args.metrics.split(",")))


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a trained stage folder (or a run folder: its last stage)")
    parser.add_argument("--repo-id", required=True, help="the hub repository, USER/NAME (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="the branch to push to (created when missing; default main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--license", default=None, help="the model card's license (default: the config's hub_license)")
    parser.add_argument("--evaluation", type=Path, default=None,
                        help="a `stagediff evaluate --out` JSON for the card (default: MODEL_DIR/evaluation.json)")
    parser.add_argument("--include-checkpoints", action="store_true",
                        help="also upload checkpoints/ (with optimizer and RNG states, for resuming)")
    parser.add_argument("--dry-run", action="store_true", help="list the files to upload, with sizes; upload nothing")


def push_command(args: argparse.Namespace) -> None:
    stage_dir, _ = resolve_stage_dir(args.model_dir)
    push(stage_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
         license_id=args.license, evaluation=args.evaluation, include_checkpoints=args.include_checkpoints,
         dry_run=args.dry_run)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders (every finished stage) or stage folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for index.html and its PNGs")


def report_command(args: argparse.Namespace) -> None:
    print(f"wrote {write_report(args.run_dirs, args.out)} (open it in a browser)")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default OUTPUT_DIR/report)")


def compare_command(args: argparse.Namespace) -> None:
    """Train a config's stages (finished ones are reused), then report on all of them."""
    config = load_config(args.config, args.overrides)
    run(config, force_stages=tuple(args.force_stage), overwrite=args.overwrite)
    if PartialState().is_main_process:
        page = write_report([Path(config.output_dir)], args.out or Path(config.output_dir) / "report")
        print(f"wrote {page} (open it in a browser)")


COMMANDS = {
    "train": (add_train_arguments, train_command, "train the stages of a run config"),
    "sample": (add_sample_arguments, sample_command, "generate images from a trained stage"),
    "evaluate": (add_evaluate_arguments, evaluate_command, "sample and score a trained stage (FD, coverage, modes)"),
    "super-resolve": (add_super_resolve_arguments, super_resolve_command,
                      "super-resolve image files with a trained sr model (local folder or hub id)"),
    "study": (add_study_arguments, study_command, "retrain a config over training seeds and variants, tabulate"),
    "push": (add_push_arguments, push_command, "upload a trained stage with a model card to a hub"),
    "report": (add_report_arguments, report_command,
               "an HTML page with curves, samples and a comparison table of trained runs"),
    "compare": (add_compare_arguments, compare_command,
                "train a config's stages (e.g. configs/compare_families.yaml), then write their report"),
    "benchmark": (add_benchmark_arguments, benchmark_command,
                  "measure training and sampling speed: our loop vs a baseline loop, latent vs pixel, samplers"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stagediff", description=" ".join(__doc__.split()))
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except (ConfigError, HubError, NonFiniteLossError, OSError, ValueError) as err:
        # User-facing failures carry messages naming the file, key or value; no traceback needed.
        sys.exit(f"stagediff {args.command}: error: {err}")


if __name__ == "__main__":
    main()
