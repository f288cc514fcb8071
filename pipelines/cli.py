"""`stagediff` command line: train, sample. `scripts/*.py` call the same functions, so
`accelerate launch scripts/train.py ...` and `stagediff train ...` run the same job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from .config import ConfigError, load_config, parse_run_config
from .images import save_grid, save_png, to_uint8
from .registry import get_stage_kind
from .run import DONE_FILE, run


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML run config, e.g. configs/mnist_vae.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides; stages are addressed by name, e.g. stages.vae.training.max_steps=100")
    parser.add_argument("--force-stage", action="append", default=[], metavar="NAME",
                        help="retrain this stage even if its outputs match the config (repeatable)")


def train_command(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    run(config, force_stages=tuple(args.force_stage))


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a trained stage folder (or a run folder: its last stage)")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default MODEL_DIR/generated)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver"], default=None,
                        help="diffusion sampler (default dpmsolver, i.e. DPM-Solver++); ddpm is the seed's "
                             "ancestral sampler with all T steps")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; ddpm: all T)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


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
    config = parse_run_config(yaml.safe_load((stage_dir / "config.yaml").read_text()))
    return stage_dir, config.stage(stage_dir.name).kind


def sample_command(args: argparse.Namespace) -> None:
    stage_dir, kind = resolve_stage_dir(args.model_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out or stage_dir / "generated"
    generator = torch.Generator(device).manual_seed(args.seed)
    batches = []
    for start in range(0, args.n, args.batch_size):
        count = min(args.batch_size, args.n - start)
        batches.append(get_stage_kind(kind).sample(stage_dir, count, generator, device,
                                                   sampler=args.sampler, steps=args.steps).cpu())
    images = torch.cat(batches)
    save_grid(images, out / "grid.png")
    for index, image in enumerate(to_uint8(images)):
        save_png(image, out / f"{index:05d}.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


COMMANDS = {
    "train": (add_train_arguments, train_command, "train the stages of a run config"),
    "sample": (add_sample_arguments, sample_command, "generate images from a trained stage"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stagediff", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"stagediff {args.command}: error: {err}")


if __name__ == "__main__":
    main()
