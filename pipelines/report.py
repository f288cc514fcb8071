"""`stagediff report`: what trained runs did, in one page people look at.

`write_report(run_dirs, out)` writes `out/index.html` and the PNGs it shows: per stage, its training
curves (from `history.jsonl`), its sample grid (a VAE's: data / reconstruction pairs, then decoded
prior samples), a super-resolution stage's evaluation figure, and its metrics; above them, a
comparison table of every generative stage of the runs given, and, when the runs hold the course's
families, the course's table of their advantages and drawbacks with the measured numbers beside
each line. The page is self-contained: inline CSS, no script, nothing fetched; images are the PNGs
beside it, referenced by relative paths.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from .registry import get_stage_kind  # noqa: E402
from .stage_folder import (EVALUATION_FILE, METRICS_FILE, SAMPLES_FILE, component_classes,  # noqa: E402
                           component_parameters, finished_stages, read_history, read_json, stage_block)
from .stages.base import Stage  # noqa: E402

PAGE = "index.html"
NOT_TRAINING_TERMS = {"step", "images_per_s", "lr", "nonfinite_skips", "grad_scaler_skips"}
SPACE_NAMES = {"image": "pixels", "vector": "2D vectors", "latent": "VAE latents"}


@dataclass
class StageResult:
    """One finished stage folder, read back."""

    run: str
    name: str
    kind: type[Stage]  # the stage class, which knows its family
    folder: Path
    block: dict  # the stage's entry in its config.yaml
    metrics: dict
    evaluation: dict = field(default_factory=dict)  # `stagediff evaluate --out` means, when present
    history: list[dict] = field(default_factory=list)

    @property
    def space(self) -> str:
        return self.kind.space(self.folder)

    @property
    def label(self) -> str:
        return f"{self.run}/{self.name}"

    def metric(self, key: str):
        """A metric from `stagediff evaluate` when it was run, else from the end of training."""
        return self.evaluation.get(key, self.metrics.get(key))

    def sampling_parameters(self) -> int:
        """Parameters of the networks that sample: not the family's auxiliary ones (a GAN's
        discriminator), nor a latent stage's VAE (its own stage in the table), which only decodes."""
        skipped = set(self.kind.auxiliary_components) | ({"vae"} if self.space == "latent" else set())
        return sum(component_parameters(self.folder, sub) for sub in component_classes(self.folder)
                   if sub not in skipped)

    def evaluations_per_sample(self) -> str:
        """Network evaluations per sample with the stage's sampler, and the decoder's for latents."""
        return self.kind.passes_per_sample(self.block) + (" + decoder" if self.space == "latent" else "")


def read_stage(folder: Path, run: str) -> StageResult:
    block = stage_block(folder)
    return StageResult(run, folder.name, get_stage_kind(block["kind"]), folder, block, read_json(folder, METRICS_FILE),
                       read_json(folder, EVALUATION_FILE).get("mean", {}), read_history(folder))


def collect(run_dirs: list[Path]) -> list[StageResult]:
    """Every finished stage of the runs given; runs are named by their folder (numbered when two clash)."""
    names: dict[str, int] = {}
    results = []
    for run_dir in run_dirs:
        stages = finished_stages(run_dir)
        run_name = (run_dir if stages != [run_dir] else run_dir.parent).resolve().name
        names[run_name] = names.get(run_name, 0) + 1
        if names[run_name] > 1:
            run_name = f"{run_name}-{names[run_name]}"
        results += [read_stage(folder, run_name) for folder in stages]
    return results


# --------------------------------------------------------------------------- figures


def plot_curves(stage: StageResult, path: Path) -> Path | None:
    """One small panel per logged term (training, then validation) against the step; None without history."""
    training = [row for row in stage.history if not any(k.startswith("val/") for k in row)]
    validation = [row for row in stage.history if any(k.startswith("val/") for k in row)]
    panels = [(key, rows) for rows, keys in
              ((training, sorted({k for row in training for k in row} - NOT_TRAINING_TERMS)),
               (validation, sorted({k for row in validation for k in row if k.startswith("val/")})))
              for key in keys]
    panels = [(key, points) for key, rows in panels
              if (points := [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))])]
    if not panels:
        return None
    columns = min(4, len(panels))
    rows_count = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows_count, columns, figsize=(3.2 * columns, 2.4 * rows_count), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, points) in zip(axes.flat, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, color="tab:orange" if key.startswith("val/") else "tab:blue",
                marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        # Losses that start orders of magnitude above where they end read better on a log axis.
        if min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return save_figure(figure, path, dpi=80)


def save_figure(figure, path: Path, dpi: int) -> Path:
    """Lay out, write as PNG and close a matplotlib figure; its path."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


GUIDANCE_SWEEP_KEYS = ("conditional_accuracy", "fd", "fd_per_class", "sampling_seconds_per_sample")


def format_guidance_sweep(reports: list[dict]) -> str:
    """A markdown table of `evaluate_generation` reports at several guidance scales, one row each."""
    lines = ["| guidance w | " + " | ".join(GUIDANCE_SWEEP_KEYS) + " |", "|---" * (len(GUIDANCE_SWEEP_KEYS) + 1) + "|"]
    for report in reports:
        cells = [fmt(report["mean"].get(key), 4) for key in GUIDANCE_SWEEP_KEYS]
        lines.append(f"| {report['guidance_scale']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_guidance_sweep(reports: list[dict], path: Path) -> Path:
    """FD against conditional accuracy, a point per guidance scale: the trade-off curve of
    classifier-free guidance (Ho & Salimans 2022, fig. 4)."""
    accuracy = [100 * r["mean"]["conditional_accuracy"] for r in reports]
    fd = [r["mean"]["fd"] for r in reports]
    figure, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.plot(accuracy, fd, marker="o")
    for a, f, report in zip(accuracy, fd, reports):
        ax.annotate(f"w={report['guidance_scale']:g}", (a, f), textcoords="offset points", xytext=(-8, 6), fontsize=8)
    ax.set_xlabel("conditional accuracy (%)")
    ax.set_ylabel("Fréchet distance")
    ax.grid(alpha=0.3)
    return save_figure(figure, path, dpi=120)


def copy_image(source: Path, out: Path, name: str) -> str | None:
    """Copy a PNG next to the page; its relative path, or None when the run has none."""
    if not source.is_file():
        return None
    shutil.copyfile(source, out / name)
    return name


# --------------------------------------------------------------------------- tables


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def likelihood(stage: StageResult) -> str:
    """The family's answer to "what is ln p(x)?", with the measured value where there is one."""
    found = stage.kind.likelihood(stage.metrics, stage.space)
    if found.kind == "none":
        return "none"
    if found.value is None:
        return f"{found.kind} (not evaluated)"
    return f"{found.kind}: {found.name + ' ' if found.name else ''}{fmt(found.value)} {found.unit}"


COMPARISON_COLUMNS = ["run / stage", "family", "space", "parameters", "training s", "training s with inputs",
                      "likelihood", "FD",
                      "FD floor", "SWD", "classes", "class KL", "% of requested class", "FD per class", "modes", "% HQ",
                      "sampling s / sample", "evaluations / sample"]


def training_budget(stage: StageResult, stages: list[StageResult]) -> str:
    """The stage's training seconds with those of the stages it stands on (a latent stage's VAE, and
    so on), so that a pixel stage and a latent one compare at equal compute: "660 (ldm 420 + vae 240)"."""
    by_name = {s.name: s for s in stages if s.run == stage.run}
    chain = [stage]
    while chain[-1].block.get("input") in by_name:
        chain.append(by_name[chain[-1].block["input"]])
    seconds = [s.metrics.get("train_seconds") for s in chain]
    if None in seconds:
        return "—"
    if len(chain) == 1:
        return fmt(seconds[0], 4)
    return f"{fmt(sum(seconds), 4)} ({' + '.join(f'{s.name} {fmt(t, 4)}' for s, t in zip(chain, seconds))})"


def comparison_rows(stages: list[StageResult]) -> list[list[str]]:
    """One row per generative stage (super-resolution stages have their own figure and metrics)."""
    rows = []
    for s in stages:
        if s.kind.evaluation_task != "generation":
            continue
        rows.append([s.label, s.kind.kind, SPACE_NAMES.get(s.space, s.space), fmt(s.sampling_parameters()),
                     fmt(s.metrics.get("train_seconds"), 4), training_budget(s, stages), likelihood(s),
                     fmt(s.metric("fd")),
                     fmt(s.metric("fd_train_vs_heldout")), fmt(s.metric("swd")), fmt(s.metric("classes_covered")),
                     fmt(s.metric("class_kl")), fmt(percent(s.metric("conditional_accuracy"))),
                     fmt(s.metric("fd_per_class")), fmt(s.metric("modes_covered")),
                     fmt(percent(s.metric("high_quality_fraction"))),
                     fmt(s.metric("sampling_seconds_per_sample")), s.evaluations_per_sample()])
    return rows


# The course's table of advantages (+) and drawbacks (−), one line per property: the verdicts are
# each family's (`Stage.course_verdicts`), the lines in between are what these runs measured.
VERDICT_LINES = ("ln p(x) of a datum", "maximum-likelihood training", "architecture", "size of Z",
                 "what else the course says")


def family_table(stages: list[StageResult]) -> tuple[list[str], list[list[str]]] | None:
    """The course's table of advantages and drawbacks, measured; None unless two families are present."""
    best: dict[type[Stage], StageResult] = {}
    for s in stages:  # per family, the stage with the lowest FD (the latent one, when both exist)
        if s.kind.course_name and (s.kind not in best or (s.metric("fd") or 1e9) < (best[s.kind].metric("fd") or 1e9)):
            best[s.kind] = s
    if len(best) < 2:
        return None
    families = sorted(best, key=lambda kind: kind.course_part)

    def sampling(kind: type[Stage]) -> str:
        s, verdict = best[kind], kind.course_verdicts["efficient sampling"]
        seconds = s.metric("sampling_seconds_per_sample")
        if seconds is None:
            return verdict
        return f"{verdict} network passes: {s.evaluations_per_sample()}; {fmt(seconds)} s/sample"

    def quality(kind: type[Stage]) -> str:
        s = best[kind]
        if s.metric("fd") is not None:
            return f"FD {fmt(s.metric('fd'))}, {fmt(s.metric('classes_covered'))} classes ({s.label})"
        # A VAE samples by decoding z ~ N(0, I): the latent stages trained on it measured that.
        prior = [t.metric("fd_vae_prior") for t in stages if t.run == s.run and t.block.get("input") == s.name
                 and t.metric("fd_vae_prior") is not None]
        return f"decoding z ~ N(0, I): FD {fmt(min(prior))}" if prior else "—"

    lines = {
        "efficient sampling": [sampling(k) for k in families],
        VERDICT_LINES[0]: [k.course_verdicts[VERDICT_LINES[0]] for k in families],
        "measured": [likelihood(best[k]) for k in families],
        **{line: [k.course_verdicts[line] for k in families] for line in VERDICT_LINES[1:]},
        "samples (FD, classes covered)": [quality(k) for k in families],
        "training time (with the stages it stands on)": [f"{training_budget(best[k], stages)} s" for k in families],
    }
    return ["property"] + [k.course_name for k in families], [[line, *cells] for line, cells in lines.items()]


# --------------------------------------------------------------------------- page


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; margin: 0.3em 0; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
section { border-top: 2px solid #eee; margin-top: 2em; }
"""


def html_table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(src: str | None, caption: str, width: int | None = None) -> str:
    if src is None:
        return ""
    size = f' width="{width}"' if width else ""
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}"{size}>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def stage_section(stage: StageResult, out: Path) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stage.label)
    parts = [f'<section id="{slug}"><h3>{html.escape(stage.label)}: {html.escape(stage.kind.kind)} on '
             f"{html.escape(SPACE_NAMES.get(stage.space, stage.space))}</h3>"]
    curves = plot_curves(stage, out / f"{slug}-curves.png")
    parts.append(figure(curves and curves.name, "training curves"))
    parts.append(figure(copy_image(stage.folder / SAMPLES_FILE, out, f"{slug}-samples.png"),
                        stage.kind.preview_caption, 320))
    if stage.kind.evaluation_task == "sr":
        parts.append(figure(copy_image(stage.folder / "evaluation" / "figures" / "all.png", out, f"{slug}-evaluation.png"),
                            "`stagediff evaluate`: input, bicubic, regression, samples, ground truth"))
        sr_metrics = stage.folder / "evaluation" / METRICS_FILE
        if sr_metrics.is_file():
            results = json.loads(sr_metrics.read_text())["results"]
            keys = sorted({k for metrics in results.values() for k in metrics})
            parts.append(html_table(["method", *keys], [[method, *(fmt(m.get(k)) for k in keys)]
                                                         for method, m in results.items()], f"{slug}-sr"))
    metrics = {**stage.metrics, **{f"{k} (evaluate)": v for k, v in stage.evaluation.items()}}
    parts.append(html_table(["metric", "value"], [[k, fmt(v, 4)] for k, v in metrics.items()], f"{slug}-metrics"))
    return "".join(parts) + "</section>"


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write `out/index.html` and its PNGs for the finished stages of `run_dirs`; returns the page."""
    stages = collect([Path(p) for p in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>stagediff report</title>"
             f"<style>{CSS}</style></head><body><h1>stagediff report</h1>",
             "<p>Runs: " + ", ".join(html.escape(str(Path(p))) for p in run_dirs) + ". FD: Fréchet distance to "
             "the held-out split in a small classifier's feature space (FD floor: train vs held-out); SWD: sliced "
             "Wasserstein distance of Laplacian-pyramid patches to the held-out split (x1e3, lower is more "
             "realistic; needs no labels, so photos have it); classes: "
             "classes with at least 1% of the samples; sampling time and FD as measured at the end of training, "
             "or by <code>stagediff evaluate</code> where its <code>"
             f"{EVALUATION_FILE}</code> is present.</p>"]
    rows = comparison_rows(stages)
    if rows:
        parts += ["<h2>Comparison</h2>", html_table(COMPARISON_COLUMNS, rows, "comparison")]
    families = family_table(stages)
    if families:
        parts += ["<h2>The course's advantages and drawbacks, measured</h2>",
                  "<p>+ an advantage, − a drawback, as the course lists them; numbers from these runs.</p>",
                  html_table(*families, "families")]
    parts += ["<h2>Stages</h2>", *(stage_section(stage, out) for stage in stages), "</body></html>"]
    page = out / PAGE
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
