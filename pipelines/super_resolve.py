"""`stagediff super-resolve`: image files in, super-resolved PNGs out, with a trained
`SuperResolutionPipeline` (a local folder or a hub id).

Rules, stated once:
* Inputs: files, folders (their image files, not recursive) and glob patterns, in sorted order.
* Colour: converted to the model's channels (L or RGB); an alpha channel is set aside, upscaled
  bicubically and put back, so RGBA in gives RGBA out.
* Size: any size from MIN_INPUT_SIDE px, kept as it is. Sides are padded (edge replication) to
  what the UNet and VAE can divide, and the output is cropped back to exactly `scale` times the
  input. With `max_input_side` set, a longer side is first resized down (keeping the aspect
  ratio, with a note).
* Memory: a side longer than `tile` input px is cut into tiles of `tile` px a side overlapping
  by `tile_overlap` (default a quarter of the tile), whose UNet outputs are blended at every
  sampling step (`diffusion.Tiling`); a smaller input is one tile, i.e. not cut. The UNet's and
  the VAE's activations then depend on `batch_size` tiles, not on the input; what grows with the
  area is the canvas alone, ~170 bytes per output pixel and sample (a 1920x2560 output from a
  tiny UNet: +0.8 GiB with tiles of 16, +1.1 GiB with 64, +2.7 GiB untiled). `tile` 0 or None:
  the whole image at once, and the UNets' middle-block attention then costs time quadratic in
  the area (a 512x512 output in 20 steps on one CPU thread: 333 s untiled, 205 s with tiles of
  64, 44 s with 32).
* Tile size: GroupNorm takes its statistics over a tile, so tiles differ from the whole image
  the more, the smaller they are (PSNR tiled vs untiled for random UNets on a 96x128 input: 31-37
  dB with tiles of 64, 26-30 with 32, 21-24 with 16); DEFAULT_TILE keeps 64.
* Randomness: sample k of every input comes from its own generator seeded with `seed + k`, so an
  output does not depend on which other files were given or on `batch_size`.
* Unreadable or too small inputs are reported by name; the others are still processed.
"""

from __future__ import annotations

import glob
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..modules.sr import downsample, resize
from .data import load_data
from .diffusion import (SuperResolutionPipeline, checked_tile_overlap, downsampling_factor, make_sampler,
                        pil_to_model_range, sampler_and_steps)
from .evaluation import cache_dir, get_feature_classifier, image_metrics, super_resolution_metrics
from .images import save_grid, save_png, to_uint8
from .registry import parse_run_config
from .stage_folder import DONE_FILE, METRICS_FILE, read_run_config, stage_block, verify_exported_weights
from .stages.sr import SRStage

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MIN_INPUT_SIDE = 2
DEFAULT_TILE = 64  # input px (256 output px at x4); see "Tile size" above


class InputError(ValueError):
    """An input that cannot be super-resolved; the message names it."""


@dataclass
class LoadedImage:
    pixels: torch.Tensor  # (1, C, h, w) in [-1, 1], the model's channels
    alpha: torch.Tensor | None  # (1, 1, h, w) in [-1, 1], or None


def collect_inputs(specs: list[str]) -> list[Path]:
    """Files, folders and globs -> sorted, de-duplicated image paths; a spec matching nothing is an error."""
    paths = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not found:
            raise InputError(f"{spec}: no such file, no image files in that folder, or no match for that pattern "
                             f"(image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def load_image(path: Path, channels: int, max_input_side: int | None = None) -> LoadedImage:
    """Read `path` as the model's `channels` (see the module's colour and size rules)."""
    try:
        with Image.open(path) as image:
            image.load()  # open() reads only the header; truncated files fail here
            if image.mode == "P":
                image = image.convert("RGBA")
            alpha = image.getchannel("A") if "A" in image.getbands() else None
            image = image.convert("L" if channels == 1 else "RGB")
    except Exception as err:  # PIL raises many types on corrupt data (and DecompressionBombError)
        raise InputError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    if min(image.size) < MIN_INPUT_SIDE:
        raise InputError(f"{path}: {image.width}x{image.height} px is too small; inputs need at least "
                         f"{MIN_INPUT_SIDE} px on each side")
    if max_input_side is not None and max(image.size) > max_input_side:
        ratio = max_input_side / max(image.size)
        size = (max(MIN_INPUT_SIDE, round(image.width * ratio)), max(MIN_INPUT_SIDE, round(image.height * ratio)))
        tqdm.write(f"note: {path} is {image.width}x{image.height} px; resized to {size[0]}x{size[1]} "
                   f"(--max-input-side {max_input_side})")
        image = image.resize(size, Image.Resampling.BICUBIC)
        alpha = alpha.resize(size, Image.Resampling.BICUBIC) if alpha is not None else None
    return LoadedImage(pil_to_model_range(image), pil_to_model_range(alpha) if alpha is not None else None)


def input_multiple(pipeline: SuperResolutionPipeline) -> int:
    """Input sides must be multiples of this: the output's, scale times larger, must divide into
    the VAE's latent grid and then the UNet's downsamplings."""
    levels = len(pipeline.unet.config.block_out_channels) - 1
    needed = downsampling_factor(pipeline.vqvae) * 2 ** levels
    return needed // math.gcd(needed, pipeline.config.scale)


@torch.no_grad()
def super_resolve_image(pipeline: SuperResolutionPipeline, image: LoadedImage, num_samples: int, batch_size: int,
                        steps: int | None, seed: int, tile: int | None = DEFAULT_TILE,
                        tile_overlap: int | None = None) -> torch.Tensor:
    """(num_samples, C (+1 for alpha), H, W) in [-1, 1]: samples of one input, padded then cropped
    back; tiled when a side is longer than `tile` (None or 0: never), `batch_size` samples per
    pipeline call and tiles per UNet call."""
    scale = pipeline.config.scale
    height, width = image.pixels.shape[-2:]
    multiple = input_multiple(pipeline)
    pad = (0, -width % multiple, 0, -height % multiple)
    padded = F.pad(image.pixels, pad, mode="replicate")
    outputs = []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        generators = [torch.Generator().manual_seed(seed + k) for k in range(start, start + count)]
        out = pipeline(padded.expand(count, -1, -1, -1), num_inference_steps=steps, generator=generators,
                       output_type="pt", tile_size=tile or None, tile_overlap=tile_overlap,
                       tile_batch_size=batch_size).images
        outputs.append(out[..., : height * scale, : width * scale].cpu())
    samples = torch.cat(outputs)
    if image.alpha is not None:
        alpha = resize(image.alpha, (height * scale, width * scale)).clamp(-1, 1)
        samples = torch.cat([samples, alpha.expand(len(samples), -1, -1, -1)], 1)
    return samples


def output_names(path: Path, scale: int, num_samples: int) -> list[str]:
    stem = f"{path.stem}_x{scale}"
    return [f"{stem}.png"] if num_samples == 1 else [f"{stem}_{k}.png" for k in range(num_samples)]


def super_resolve_files(inputs: list[str], model: str, out: Path, scale: int | None = None,
                        sampler: str | None = None, steps: int | None = None, num_samples: int = 1, seed: int = 0,
                        batch_size: int = 16, max_input_side: int | None = None, device: str | None = None,
                        tile: int | None = DEFAULT_TILE, tile_overlap: int | None = None) -> list[str]:
    """Super-resolve every input into `out` (see the module's rules); returns the error messages of
    the inputs that failed."""
    if num_samples < 1 or batch_size < 1 or (max_input_side is not None and max_input_side < MIN_INPUT_SIDE):
        raise ValueError(f"--num-samples {num_samples}, --batch-size {batch_size} and --max-input-side "
                         f"{max_input_side} must be >= 1, >= 1 and >= {MIN_INPUT_SIDE}")
    if tile:
        checked_tile_overlap(tile, tile_overlap)  # before any input is read
    paths = collect_inputs(inputs)
    if (Path(model) / DONE_FILE).is_file():  # a local stage folder: its weights as they were trained
        verify_exported_weights(Path(model))
    pipeline = SuperResolutionPipeline.from_pretrained(model)
    if scale is not None and scale != pipeline.config.scale:
        raise ValueError(f"--scale {scale}: the model {model} was trained for x{pipeline.config.scale} only")
    sampler, steps = sampler_and_steps(sampler, steps)
    pipeline.scheduler = make_sampler(sampler, pipeline.scheduler.config)
    pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline.set_progress_bar_config(disable=True)
    channels = pipeline.image_channels
    errors = []
    for path in tqdm(paths, desc="super-resolving", unit="image"):
        try:
            image = load_image(path, channels, max_input_side)
        except InputError as err:
            errors.append(str(err))
            tqdm.write(f"skipped: {err}")
            continue
        samples = super_resolve_image(pipeline, image, num_samples, batch_size, steps, seed, tile, tile_overlap)
        for name, array in zip(output_names(path, pipeline.config.scale, num_samples), to_uint8(samples)):
            save_png(array, out / name)
    print(f"wrote {len(paths) - len(errors)} of {len(paths)} inputs to {out}"
          + (f"; {len(errors)} failed:\n  " + "\n  ".join(errors) if errors else ""))
    return errors


# ----------------------------------------------------------------------------- evaluation


def find_regression_baseline(stage_dir: Path) -> Path | None:
    """A finished `objective: regression` sr stage of the same run, at the same scale."""
    config = read_run_config(stage_dir)
    scale = stage_block(stage_dir, config)["model"].get("scale")
    for stage in config["stages"]:
        model = stage.get("model", {})
        folder = stage_dir.parent / stage["name"]
        if (stage["kind"] == SRStage.kind and model.get("objective") == "regression" and model.get("scale") == scale
                and (folder / DONE_FILE).is_file()):
            return folder
    return None


def evaluate_super_resolution(model_dir: Path, regression_dir: Path | None, num_images: int, num_samples: int,
                              sampler: str | None, steps: int | None, seed: int, device: str | None,
                              out: Path) -> dict[str, dict[str, float]]:
    """The SR table on held-out images: bicubic, the L2 regressor (when given) and SR samples.

    For each method: PSNR, SSIM, consistency PSNR (`super_resolution_metrics`), FD and classes
    covered against the whole held-out split (`image_metrics`), seconds per image; for SR also
    the diversity, the per-pixel standard deviation across `num_samples` samples of one input
    (in [0, 1] units, averaged over pixels and inputs). Writes `metrics.json` and, for the first 8
    inputs, figures (input, bicubic, regression, 3 samples, ground truth) under `out`.
    """
    sampler, steps = sampler_and_steps(sampler, steps)
    config = parse_run_config(read_run_config(model_dir))
    stage = config.stage(model_dir.name)
    data = load_data(config.data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference = torch.stack([item["x"] for item in data.validation])
    labels = torch.stack([item["label"] for item in data.validation])
    high_res = reference[:num_images]
    scale, blur = stage.model.scale, stage.model.blur_sigma
    low_res = downsample(high_res, scale, blur)
    classifier = get_feature_classifier(data.config, cache_dir(), device)[0] if data.num_classes else None

    def score(outputs: torch.Tensor, seconds: float) -> dict[str, float]:
        metrics = {**super_resolution_metrics(outputs, high_res, low_res, scale, blur),
                   "seconds_per_image": seconds / len(outputs)}
        if classifier is not None:
            found = image_metrics(outputs, reference, classifier, labels)
            metrics.update(fd=found["fd"], classes_covered=found["classes_covered"])
        return metrics

    def run_pipeline(folder: Path, draws: int) -> tuple[torch.Tensor, float]:
        pipeline = SuperResolutionPipeline.from_pretrained(folder).to(device)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.scheduler = make_sampler(sampler, pipeline.scheduler.config)
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        outputs = torch.stack([torch.cat([pipeline(chunk, num_inference_steps=steps, generator=generator,
                                                   output_type="pt").images.cpu() for chunk in low_res.split(256)])
                               for _ in range(draws)])  # (draws, N, C, H, W)
        return outputs, (time.perf_counter() - started) / draws

    started = time.perf_counter()
    bicubic = resize(low_res, tuple(high_res.shape[-2:])).clamp(-1, 1)
    results = {"bicubic": score(bicubic, time.perf_counter() - started)}
    columns = [torch.nn.functional.interpolate(low_res, size=high_res.shape[-2:], mode="nearest"), bicubic]
    if regression_dir is not None:
        regression, seconds = run_pipeline(regression_dir, 1)
        results["regression"] = score(regression[0], seconds)
        columns.append(regression[0])
    samples, seconds = run_pipeline(model_dir, num_samples)
    results["sr"] = score(samples[0], seconds)
    results["sr"]["diversity"] = (samples / 2).std(0).mean().item() if num_samples > 1 else 0.0
    columns += [samples[k] for k in range(min(3, num_samples))] + [high_res]

    figures = torch.stack(columns, 1)[:8]  # (8, columns, C, H, W)
    for index, row in enumerate(figures):
        save_grid(row, out / "figures" / f"example_{index:02d}.png", nrow=len(row))
    save_grid(figures.flatten(0, 1), out / "figures" / "all.png", nrow=figures.shape[1])
    report = {"model_dir": str(model_dir), "regression_dir": str(regression_dir) if regression_dir else None,
              "scale": scale, "num_images": len(high_res), "num_samples": num_samples,
              "sampler": sampler, "steps": steps, "results": results,
              "figure_columns": ["input", "bicubic"] + (["regression"] if regression_dir else [])
              + [f"sample {k}" for k in range(min(3, num_samples))] + ["ground truth"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2))
    return results
