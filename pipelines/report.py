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
import yaml  # noqa: E402

from .hub import COMPONENT_CONFIGS, parameter_count  # noqa: E402
from .run import DONE_FILE  # noqa: E402
from .stages.spaces import SPACE_FILE, read_space  # noqa: E402

HISTORY_FILE = "history.jsonl"
PAGE = "index.html"
NOT_TRAINING_TERMS = {"step", "images_per_s", "lr", "nonfinite_skips", "grad_scaler_skips"}
# Components not counted as the stage's sampling network: the discriminator only judges, and a
# latent stage's VAE (its own stage in the table) only decodes.
NOT_SAMPLING_NETWORKS = {"discriminator", "vae", "vqvae"}
SPACE_NAMES = {"image": "pixels", "vector": "2D vectors", "latent": "VAE latents"}


@dataclass
class StageResult:
    """One finished stage folder, read back."""

    run: str
    name: str
    kind: str
    folder: Path
    block: dict  # the stage's entry in its config.yaml
    metrics: dict
    evaluation: dict = field(default_factory=dict)  # `stagediff evaluate --out` means, when present
    history: list[dict] = field(default_factory=list)

    @property
    def space(self) -> str:
        return read_space(self.folder) if (self.folder / SPACE_FILE).is_file() else "image"

    @property
    def label(self) -> str:
        return f"{self.run}/{self.name}"

    def metric(self, key: str):
        """A metric from `stagediff evaluate` when it was run, else from the end of training."""
        return self.evaluation.get(key, self.metrics.get(key))

    def sampling_parameters(self) -> int:
        skipped = NOT_SAMPLING_NETWORKS - ({"vae"} if self.kind == "vae" else set())
        return sum(parameter_count(weights) for sub in self.folder.iterdir()
                   if sub.is_dir() and sub.name not in skipped
                   and any((sub / name).is_file() for name in COMPONENT_CONFIGS)
                   for weights in sub.glob("*.safetensors"))

    def evaluations_per_sample(self) -> str:
        """Network evaluations per sample: the sampler's steps for a DDPM, one pass otherwise."""
        model = self.block.get("model", {})
        if self.kind in ("ddpm", "sr") and model.get("objective") != "regression":
            sampler = model.get("sampler", "dpmsolver")
            steps = model.get("num_train_timesteps", 1000) if sampler == "ddpm" else model.get("num_inference_steps", 20)
            evaluations = f"{steps} ({sampler})"
        else:
            evaluations = "1"
        return evaluations + (" + decoder" if self.space == "latent" else "")


def finished_stages(path: Path) -> list[Path]:
    """The finished stage folders of a run folder, in the config's order; a stage folder itself."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if (path / DONE_FILE).is_file():
        return [path]
    done = sorted(path.glob(f"*/{DONE_FILE}"))
    if not done:
        raise FileNotFoundError(f"{path}: neither a trained stage folder (no {DONE_FILE}) nor a run folder holding one")
    folders = {p.parent.name: p.parent for p in done}
    # The newest config knows every stage's place, earlier ones only theirs.
    newest = max(done, key=lambda p: p.stat().st_mtime).parent / "config.yaml"
    order = [s["name"] for s in yaml.safe_load(newest.read_text())["stages"]]
    return [folders[name] for name in order if name in folders] + sorted(
        folder for name, folder in folders.items() if name not in order)


def read_stage(folder: Path, run: str) -> StageResult:
    stages = yaml.safe_load((folder / "config.yaml").read_text())["stages"]
    block = next(s for s in stages if s["name"] == folder.name)
    evaluation = {}
    if (folder / "evaluation.json").is_file():
        evaluation = json.loads((folder / "evaluation.json").read_text()).get("mean", {})
    history = []
    if (folder / HISTORY_FILE).is_file():
        history = [json.loads(line) for line in (folder / HISTORY_FILE).read_text().splitlines() if line.strip()]
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    return StageResult(run, folder.name, block["kind"], folder, block, metrics, evaluation, history)


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
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


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


def likelihood(stage: StageResult) -> str:
    """The family's answer to "what is ln p(x)?", with the measured value where there is one."""
    m = stage.metrics
    if stage.kind == "vae":
        return f"bound: −ELBO {fmt(m.get('neg_elbo_bits_per_dim'))} bits/dim"
    if stage.kind == "flow":
        if "val_bits_per_dim" in m:
            return f"exact: {fmt(m['val_bits_per_dim'])} bits/dim"
        unit = "per latent" if stage.space == "latent" else "per vector"
        return f"exact: {fmt(m.get('val_nll_nats'))} nats {unit}"
    if stage.kind == "ddpm":
        return "bound (not evaluated)"
    return "none"


COMPARISON_COLUMNS = ["run / stage", "family", "space", "parameters", "training s", "likelihood", "FD",
                      "FD floor", "classes", "class KL", "modes", "% HQ", "sampling s / sample", "evaluations / sample"]


def comparison_rows(stages: list[StageResult]) -> list[list[str]]:
    """One row per generative stage (super-resolution stages have their own figure and metrics)."""
    rows = []
    for s in stages:
        if s.kind == "sr":
            continue
        high_quality = s.metric("high_quality_fraction")
        rows.append([s.label, s.kind, SPACE_NAMES.get(s.space, s.space), fmt(s.sampling_parameters()),
                     fmt(s.metrics.get("train_seconds"), 4), likelihood(s), fmt(s.metric("fd")),
                     fmt(s.metric("fd_train_vs_heldout")), fmt(s.metric("classes_covered")),
                     fmt(s.metric("class_kl")), fmt(s.metric("modes_covered")),
                     fmt(None if high_quality is None else 100 * high_quality),
                     fmt(s.metric("sampling_seconds_per_sample")),
                     s.evaluations_per_sample() if s.kind != "vae" else "1 (decoder)"])
    return rows


# The course's advantages (+) and drawbacks (−) of each family, one line per property; each cell
# says the course's verdict, then what these runs measured, where a number answers it.
COURSE_FAMILIES = ("flow", "vae", "ddpm", "gan")
COURSE_NAMES = {"flow": "normalizing flow", "vae": "VAE", "ddpm": "DDPM", "gan": "GAN"}


def family_table(stages: list[StageResult]) -> tuple[list[str], list[list[str]]] | None:
    """The course's table of advantages and drawbacks, measured; None unless two families are present."""
    best: dict[str, StageResult] = {}
    for s in stages:  # per family, the stage with the lowest FD (the latent one, when both exist)
        if s.kind in COURSE_FAMILIES and (s.kind not in best or (s.metric("fd") or 1e9) < (best[s.kind].metric("fd") or 1e9)):
            best[s.kind] = s
    if len(best) < 2:
        return None
    families = [k for k in COURSE_FAMILIES if k in best]

    def vae_prior_fd() -> str:
        # The VAE samples by decoding z ~ N(0, I); a latent stage 2 measured that on the same data.
        values = [s.metric("fd_vae_prior") for s in stages if s.metric("fd_vae_prior") is not None]
        return f"decoding z ~ N(0, I): FD {fmt(min(values))}" if values else "—"

    def sampling(kind: str) -> str:
        s = best[kind]
        if kind == "vae":
            return "+ one decoder pass per sample"
        return (f"{'−' if kind == 'ddpm' else '+'} network passes: {s.evaluations_per_sample()}; "
                f"{fmt(s.metric('sampling_seconds_per_sample'))} s/sample")

    def quality(kind: str) -> str:
        if kind == "vae":
            return vae_prior_fd()
        s = best[kind]
        return f"FD {fmt(s.metric('fd'))}, {fmt(s.metric('classes_covered'))} classes ({s.label})"

    verdicts = {
        "efficient sampling": {k: sampling(k) for k in families},
        "ln p(x) of a datum": {"flow": "+ exact", "vae": "− lower bound only", "ddpm": "− lower bound only",
                               "gan": "− none"},
        "measured": {k: likelihood(best[k]) for k in families},
        "maximum-likelihood training": {"flow": "+ yes, early stopping on validation NLL", "vae": "− on the ELBO",
                                        "ddpm": "− on a bound (ε-loss)", "gan": "− no: a min-max game"},
        "architecture": {"flow": "− invertible layers, tractable log-det", "vae": "+ free", "ddpm": "+ free",
                         "gan": "+ free"},
        "size of Z": {"flow": "− equal to X", "vae": "+ free", "ddpm": "− z_t the size of x", "gan": "+ free"},
        "what else the course says": {"flow": "− the base distribution's shape is strongly constrained",
                                      "vae": "− diagonal Gaussian conditionals", "ddpm": "+ no encoder to learn",
                                      "gan": "− hard to optimize: convergence, mode collapse"},
        "samples (FD, classes covered)": {k: quality(k) for k in families},
        "training time": {k: f"{fmt(best[k].metrics.get('train_seconds'), 4)} s" for k in families},
    }
    header = ["property"] + [COURSE_NAMES[k] for k in families]
    return header, [[prop] + [cells.get(k, "") for k in families] for prop, cells in verdicts.items()]


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
    parts = [f'<section id="{slug}"><h3>{html.escape(stage.label)}: {html.escape(stage.kind)} on '
             f"{html.escape(SPACE_NAMES.get(stage.space, stage.space))}</h3>"]
    curves = plot_curves(stage, out / f"{slug}-curves.png")
    parts.append(figure(curves and curves.name, "training curves"))
    caption = ("top: validation images and their reconstructions, in pairs of rows; bottom: decoded prior samples"
               if stage.kind == "vae" else "samples at the end of training" if stage.kind != "sr"
               else "low-resolution input, samples, ground truth")
    parts.append(figure(copy_image(stage.folder / "samples.png", out, f"{slug}-samples.png"), caption, 320))
    if stage.kind == "sr":
        parts.append(figure(copy_image(stage.folder / "evaluation" / "figures" / "all.png", out, f"{slug}-evaluation.png"),
                            "`stagediff evaluate`: input, bicubic, regression, samples, ground truth"))
        sr_metrics = stage.folder / "evaluation" / "metrics.json"
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
             "the held-out split in a small classifier's feature space (FD floor: train vs held-out); classes: "
             "classes with at least 1% of the samples; sampling time and FD as measured at the end of training, "
             "or by <code>stagediff evaluate</code> where its <code>evaluation.json</code> is present.</p>"]
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
