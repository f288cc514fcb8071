"""`stagediff` command line: train, sample, evaluate. `scripts/*.py` call the same functions, so
`accelerate launch scripts/train.py ...` and `stagediff train ...` run the same job."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from .config import ConfigError, load_config, parse_run_config
from .data import load_data
from .evaluation import generation_metrics
from .images import save_grid, save_png, to_uint8
from .registry import get_stage_kind
from .run import DONE_FILE, run
from .trainer import NonFiniteLossError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML run config, e.g. configs/mnist_vae.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides; stages are addressed by name, e.g. stages.vae.training.max_steps=100")
    parser.add_argument("--force-stage", action="append", default=[], metavar="NAME",
                        help="retrain this stage even if its outputs match the config (repeatable)")


def train_command(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    run(config, force_stages=tuple(args.force_stage))


def add_sampling_arguments(parser: argparse.ArgumentParser, default_n: int) -> None:
    parser.add_argument("model_dir", type=Path, help="a trained stage folder (or a run folder: its last stage)")
    parser.add_argument("--n", type=int, default=default_n, help=f"number of samples (default {default_n})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver"], default=None,
                        help="diffusion sampler (default dpmsolver, i.e. DPM-Solver++); ddpm is the seed's "
                             "ancestral sampler with all T steps")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; ddpm: all T)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, default_n=64)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default MODEL_DIR/generated)")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, default_n=2500)
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+K-1 and average")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics as JSON to this file")


def resolve_stage_dir(path: Path) -> tuple[Path, str]:
    """(stage folder, stage kind) for a stage folder or a run folder (its last finished stage)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    candidates = [path] if (path / DONE_FILE).is_file() else []
    if not candidates:
        config_files = sorted(path.glob(f"*/{DONE_FILE}"))
        if not config_files:
            raise FileNotFoundError(f"{path}: neither a trained stage folder (no {DONE_FILE}) "
                                    "nor a run folder holding one")
        stage_dirs = {p.parent.name: p.parent for p in config_files}
        order = [s["name"] for s in yaml.safe_load((config_files[0].parent / "config.yaml").read_text())["stages"]]
        candidates = [stage_dirs[name] for name in order if name in stage_dirs][-1:]
    stage_dir = candidates[0]
    # Only the kind is needed to sample: read it without validating the whole (maybe older) config.
    stages = yaml.safe_load((stage_dir / "config.yaml").read_text())["stages"]
    return stage_dir, next(s["kind"] for s in stages if s["name"] == stage_dir.name)


def generate(args: argparse.Namespace, stage_dir: Path, kind: str, seed: int) -> torch.Tensor:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(device).manual_seed(seed)
    stage_kind = get_stage_kind(kind)
    return torch.cat([stage_kind.sample(stage_dir, min(args.batch_size, args.n - start), generator, device,
                                        sampler=args.sampler, steps=args.steps).cpu()
                      for start in range(0, args.n, args.batch_size)])


def sample_command(args: argparse.Namespace) -> None:
    stage_dir, kind = resolve_stage_dir(args.model_dir)
    out = args.out or stage_dir / "generated"
    samples = generate(args, stage_dir, kind, args.seed)
    if samples.dim() == 2:  # vectors: a scatter picture and the numbers
        from .stages.spaces import scatter_image

        save_grid(scatter_image(samples), out / "grid.png")
        out.joinpath("samples.csv").write_text("\n".join(",".join(f"{v:.6g}" for v in row) for row in samples.tolist()))
        print(f"wrote {len(samples)} samples to {out / 'samples.csv'} and a scatter plot to {out / 'grid.png'}")
        return
    save_grid(samples, out / "grid.png")
    for index, image in enumerate(to_uint8(samples)):
        save_png(image, out / f"{index:05d}.png")
    print(f"wrote {len(samples)} images and grid.png to {out}")


def evaluate_command(args: argparse.Namespace) -> None:
    """Sample, then score against the stage's own data (the metrics of pipelines/evaluation.py)."""
    stage_dir, kind = resolve_stage_dir(args.model_dir)
    config = parse_run_config(yaml.safe_load((stage_dir / "config.yaml").read_text()))
    data = load_data(config.data)
    vae_dir = stage_dir / "vae" if (stage_dir / "model_index.json").is_file() and (stage_dir / "vae").is_dir() else None
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        started = time.perf_counter()
        samples = generate(args, stage_dir, kind, seed)
        seconds = (time.perf_counter() - started) / len(samples)
        runs.append({"seed": seed, "sampling_seconds_per_sample": seconds,
                     **generation_metrics(samples, data, args.device or samples.device, vae_dir)})
    mean = {key: statistics.fmean(r[key] for r in runs) for key in runs[0] if key != "seed"}
    report = {"model_dir": str(stage_dir), "sampler": args.sampler or "dpmsolver", "steps": args.steps,
              "num_samples": args.n, "mean": mean, "per_seed": runs}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


COMMANDS = {
    "train": (add_train_arguments, train_command, "train the stages of a run config"),
    "sample": (add_sample_arguments, sample_command, "generate images from a trained stage"),
    "evaluate": (add_evaluate_arguments, evaluate_command, "sample and score a trained stage (FD, coverage, modes)"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stagediff", description=" ".join(__doc__.split()))
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except (ConfigError, FileNotFoundError, NonFiniteLossError, ValueError) as err:
        # User-facing failures carry messages naming the file, key or value; no traceback needed.
        sys.exit(f"stagediff {args.command}: error: {err}")


if __name__ == "__main__":
    main()
