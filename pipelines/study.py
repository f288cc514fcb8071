"""Seed studies: train one config under several variants and training seeds, then tabulate.

A GAN's mode coverage or a flow's NLL varies from seed to seed; a claim such as "R1 helps" is only
worth the spread behind it. `seed_study` retrains the config for seeds 0..K-1 (each variant being a
list of `key.sub=value` overrides) and reports, per variant, the mean, min and max of each metric
of the last stage.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .registry import load_config
from .run import run


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'r1:stages.gan.model.r1_gamma=0.1,stages.gan.training.ema_decay=null' -> (name, overrides)."""
    name, _, overrides = text.partition(":")
    if not name or "=" in name:
        raise ValueError(f"--variant {text!r}: expected NAME or NAME:key.sub=value[,key.sub=value...]")
    return name, [o for o in overrides.split(",") if o]


def seed_study(config_path: str | Path, variants: dict[str, list[str]], seeds: int, output_dir: Path,
               overrides: list[str] = ()) -> dict[str, dict]:
    """Train every variant for training seeds 0..seeds-1 under `output_dir/VARIANT/seedS`.

    Returns {variant: {"per_seed": [metrics...], "mean": {...}, "min": {...}, "max": {...}}} and writes
    it to `output_dir/study.json`. Finished runs are skipped by the run's own fingerprint check,
    so an interrupted study resumes where it stopped.
    """
    results = {}
    for name, variant_overrides in variants.items():
        per_seed = []
        for seed in range(seeds):
            config = load_config(config_path, [*overrides, *variant_overrides, f"seed={seed}",
                                               f"output_dir={output_dir / name / f'seed{seed}'}"])
            per_seed.append(list(run(config).values())[-1])
        keys = [k for k in per_seed[0] if all(isinstance(m.get(k), (int, float)) for m in per_seed)]
        results[name] = {
            "overrides": variant_overrides,
            "per_seed": per_seed,
            **{stat: {k: fn(m[k] for m in per_seed) for k in keys}
               for stat, fn in (("mean", statistics.fmean), ("min", min), ("max", max))},
        }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "study.json").write_text(json.dumps(results, indent=2))
    return results


def format_study(results: dict[str, dict], metrics: list[str]) -> str:
    """A markdown table: one row per variant, `mean (min-max)` per metric."""
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, result in results.items():
        cells = []
        for key in metrics:
            if key not in result["mean"]:
                cells.append("")
                continue
            mean, low, high = (result[stat][key] for stat in ("mean", "min", "max"))
            cells.append(f"{mean:.3g} ({low:.3g}-{high:.3g})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
