"""The stage folder contract: what `output_dir/<stage>/` holds, by name, and how it is read back.

Every module that writes or reads a stage folder (run, trainer, hub, report, sampling, the CLI,
the benchmark) goes through these names and readers, so the layout is stated once:

    config.yaml       the resolved run config; this folder is the stage named like the folder
    done.json         written last: the config's fingerprint and the exported weights' SHA-256
    metrics.json      the final metrics
    history.jsonl     one JSON row of logged terms per log step (validation rows have `val/` keys)
    samples.png       the preview grid
    evaluation.json   `stagediff evaluate --out` (optional)
    stagediff.json    the stage kind and the space it samples in (image, vector or latent)
    <component>/      a network or scheduler in diffusers layout (config.json + safetensors);
                      `vae/` beside a latent stage's own networks
    checkpoints/      Accelerate states, for resuming
    cache/            latent caches

Readers take the raw YAML (not the validated schema) so that a folder written by an older
version still samples, reports and pushes.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors import safe_open

from .checkpoint import file_manifest, verify_manifest

CONFIG_FILE = "config.yaml"
DONE_FILE = "done.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.jsonl"
SAMPLES_FILE = "samples.png"
EVALUATION_FILE = "evaluation.json"
SPACE_FILE = "stagediff.json"
CHECKPOINTS_DIR = "checkpoints"
CACHE_DIR = "cache"
COMPONENT_CONFIGS = ("config.json", "scheduler_config.json")  # what marks a component subfolder
NOT_EXPORTED = (CHECKPOINTS_DIR, CACHE_DIR)  # subfolders whose safetensors are not the stage's weights


def read_run_config(stage_dir: Path) -> dict:
    """The raw run config saved in a stage folder (every stage's block)."""
    path = stage_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{stage_dir}: no {CONFIG_FILE}; expected a trained stage folder")
    return yaml.safe_load(path.read_text())


def stage_block(stage_dir: Path, config: dict | None = None, name: str | None = None) -> dict:
    """The raw block of the stage a folder holds: the entry of its config (`config`, else the
    folder's config.yaml) named `name` (default: like the folder)."""
    name = name or stage_dir.name
    stages = (config if config is not None else read_run_config(stage_dir))["stages"]
    names = [s["name"] for s in stages]
    if name not in names:
        raise ValueError(f"{(stage_dir / CONFIG_FILE).resolve()}: no stage named {name!r} "
                         f"(the folder's name); stages are {names}")
    return stages[names.index(name)]


def read_space(stage_dir: Path) -> str:
    """Where the stage's model lives: "image", "vector" or "latent" (`Stage.space` asks this; a
    FileNotFoundError naming the file when it is missing)."""
    path = stage_dir / SPACE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it says which space the stage's model lives in")
    return json.loads(path.read_text())["space"]


def write_space(stage_dir: Path, kind: str, space: str) -> None:
    (stage_dir / SPACE_FILE).write_text(json.dumps({"kind": kind, "space": space}))


def read_json(stage_dir: Path, name: str) -> dict:
    """A JSON file of the folder ({} when absent)."""
    path = stage_dir / name
    return json.loads(path.read_text()) if path.is_file() else {}


def read_history(stage_dir: Path) -> list[dict]:
    path = stage_dir / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def component_classes(stage_dir: Path) -> dict[str, str]:
    """{subfolder: class name} of the saved networks and schedulers, from their configs."""
    classes = {}
    for sub in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
        for name in COMPONENT_CONFIGS:
            if (sub / name).is_file():
                classes[sub.name] = json.loads((sub / name).read_text())["_class_name"]
    return classes


def parameter_count(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    count = 0
    with safe_open(str(path), framework="pt") as tensors:
        for key in tensors.keys():
            size = 1
            for dim in tensors.get_slice(key).get_shape():
                size *= dim
            count += size
    return count


def component_parameters(stage_dir: Path, component: str) -> int:
    return sum(parameter_count(p) for p in (stage_dir / component).glob("*.safetensors"))


# --------------------------------------------------------------------------- finished stages


def exported_weights(stage_dir: Path) -> dict[str, list]:
    """The manifest (size, SHA-256) of a finished stage's exported safetensors, kept in done.json:
    a bit flip inside a weights file is otherwise invisible (safetensors checks only its header)."""
    return file_manifest(stage_dir, (p for p in stage_dir.rglob("*.safetensors")
                                     if p.relative_to(stage_dir).parts[0] not in NOT_EXPORTED))


def write_done(stage_dir: Path, fingerprint: str) -> None:
    """Mark a stage finished: the last file its training writes."""
    (stage_dir / DONE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "files": exported_weights(stage_dir)}))


def done_fingerprint(stage_dir: Path) -> str | None:
    """The fingerprint a finished stage was trained with; None when it did not finish."""
    return read_json(stage_dir, DONE_FILE).get("fingerprint")


def verify_exported_weights(stage_dir: Path) -> None:
    """Raise CorruptCheckpointError naming an exported weights file that changed since training."""
    done = stage_dir / DONE_FILE
    verify_manifest(stage_dir, json.loads(done.read_text()).get("files", {}), done)


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
    newest = max(done, key=lambda p: p.stat().st_mtime).parent
    order = [s["name"] for s in read_run_config(newest)["stages"]]
    return [folders[name] for name in order if name in folders] + sorted(
        folder for name, folder in folders.items() if name not in order)
