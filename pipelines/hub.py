"""Sharing a trained stage on a hub: the upload folder, its model card, and the push.

A stage folder holds more than a hub repository should. The upload folder keeps what loads and
documents the model (each component's safetensors weights and JSON config, the stage's
`config.yaml`, JSON metrics and PNG images) and adds a model card, `README.md`, generated from
the run. Optimizer states, latent caches, histories and checkpoints stay local;
`include_checkpoints` adds the complete checkpoints (with their optimizer and RNG states, for
resuming elsewhere).

huggingface_hub finds the token (HF_TOKEN, then the cached login); this module only checks that
one exists and never puts it in a message or a file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_session, get_token

from .checkpoint import list_checkpoints
from .config import DEFAULT_LICENSE, check_repo_id
from .data import describe_data
from .registry import STAGE_KINDS, get_stage_kind
from .stage_folder import (CHECKPOINTS_DIR, COMPONENT_CONFIGS, CONFIG_FILE, EVALUATION_FILE, METRICS_FILE,
                           component_classes, component_parameters, read_run_config, stage_block)

CARD_FILE = "README.md"
STAGE_FILE_SUFFIXES = (".json", ".yaml", ".png")  # the stage's own files: metrics, config.yaml, samples.png
COMPONENT_FILE_SUFFIXES = (".json", ".safetensors")  # inside a component folder (vae/, unet/, ...)
REACH_TIMEOUT_S = 5.0  # an unreachable hub otherwise fails only after ~30 s, inside the upload
# Network and hub failures: huggingface_hub's errors (HTTP, offline mode, no token) are OSErrors;
# a connection that fails before any response raises its HTTP library's error.
HUB_ERRORS = (OSError, httpx2.HTTPError)

SPACES = {"image": "on pixels", "vector": "on 2D vectors", "latent": "in the latent space of stage `{input}`"}
# stagediff's own classes, found by the `_class_name` of a saved config; any other is diffusers'.
# (diffusers has a text-conditional `LatentDiffusionPipeline` of its own: ours must win.)
STAGEDIFF_CLASSES = {cls.__name__: cls.__module__ for kind in STAGE_KINDS.values() for cls in kind.exported_classes}


class HubError(RuntimeError):
    """The hub could not be reached or refused the push; the message says why."""


def upload_files(stage_dir: Path, include_checkpoints: bool = False) -> list[Path]:
    """The files of `stage_dir` that go to the hub, relative to it, sorted."""
    files = [p for p in stage_dir.iterdir() if p.is_file() and p.suffix in STAGE_FILE_SUFFIXES]
    for folder in stage_dir.iterdir():
        if folder.is_dir() and any((folder / name).is_file() for name in COMPONENT_CONFIGS):
            files += [p for p in folder.iterdir() if p.is_file() and p.suffix in COMPONENT_FILE_SUFFIXES]
    if include_checkpoints:
        files += [p for checkpoint in list_checkpoints(stage_dir / CHECKPOINTS_DIR)
                  for p in checkpoint.rglob("*") if p.is_file()]
    return sorted(p.relative_to(stage_dir) for p in files)


def build_upload_folder(stage_dir: Path, repo_id: str, out_dir: Path, license_id: str | None = None,
                        evaluation: Path | None = None, include_checkpoints: bool = False) -> list[Path]:
    """Fill the empty folder `out_dir` with exactly what a push uploads: links to the stage's files,
    `evaluation` (default: the stage's own evaluation.json, when present) and the model card.
    Returns the paths relative to `out_dir`, sorted."""
    read_run_config(stage_dir)  # a FileNotFoundError unless it is a stage folder
    for path in upload_files(stage_dir, include_checkpoints):
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / path).symlink_to((stage_dir / path).resolve())
    if evaluation is not None:
        if not evaluation.is_file():
            raise FileNotFoundError(f"--evaluation: {evaluation}: no such file")
        (out_dir / EVALUATION_FILE).unlink(missing_ok=True)
        (out_dir / EVALUATION_FILE).symlink_to(evaluation.resolve())
    (out_dir / CARD_FILE).write_text(model_card(out_dir, stage_dir.name, repo_id, license_id))
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- model card


def model_card(folder: Path, stage_name: str, repo_id: str, license_id: str | None = None) -> str:
    """The README.md of an upload folder: hub metadata, then what the model is, samples, usage,
    metrics and training config, all read from the folder's own files."""
    config = read_run_config(folder)
    stage = stage_block(folder, config, stage_name)
    stage_kind = get_stage_kind(stage["kind"])
    space = stage_kind.space(folder)
    task = stage_kind.hub_pipeline_tag if space != "vector" else None
    data = config["data"]
    metadata = ModelCardData(
        library_name="diffusers",
        license=license_id or config.get("hub_license", DEFAULT_LICENSE),
        pipeline_tag=task,
        tags=["diffusers", "stagediff", *stage_kind.hub_tags(space)] + ([task] if task else []),
        datasets=[data["dataset_name"]] if data["source"] == "hub" else None,
    )
    where = SPACES[space].format(input=stage.get("input"))
    names = [s["name"] for s in config["stages"]]
    sections = [
        f"# {repo_id}",
        f"Stage `{stage_name}` of a stagediff run: {stage_kind.description}, {where}. Every network is saved with "
        f"`save_pretrained` (safetensors + config.json).\n\nData: {describe_data(data)}.",
        "## Pipeline\n\n" + _stages_table(config["stages"][: names.index(stage_name) + 1])
        + f"\n\nThis repository holds stage `{stage_name}`:\n\n" + "\n".join(_components(folder)),
        *[f"## Samples\n\n![{p.name}]({p.name})" for p in sorted(folder.glob("*.png"))],
        "## Usage\n\n" + _usage(folder, repo_id, stage, space),
        _metrics(folder),
        "## Training\n\nThe resolved run config (`config.yaml` in this repository; `stagediff train --config "
        "config.yaml output_dir=...` retrains it):\n\n<details><summary>config.yaml</summary>\n\n"
        f"```yaml\n{(folder / CONFIG_FILE).read_text().strip()}\n```\n\n</details>",
    ]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"))


def _stages_table(stages: list[dict]) -> str:
    """The stages in training order, up to this repository's (the last row)."""
    rows = ["| stage | kind | input | steps | batch size | learning rate |", "|---|---|---|---|---|---|"]
    for s in stages:
        t = s["training"]
        rows.append(f"| {s['name']} | {s['kind']} | {s.get('input') or ''} | {t['max_steps']} | {t['batch_size']} "
                    f"| {t['learning_rate']:g} |")
    return "\n".join(rows)


def _components(folder: Path) -> list[str]:
    lines = []
    for sub, class_name in component_classes(folder).items():
        has_weights = any((folder / sub).glob("*.safetensors"))
        lines.append(f"- `{sub}/`: `{class_name}`"
                     + (f", {component_parameters(folder, sub):,} parameters" if has_weights else ""))
    return lines


def _usage(folder: Path, repo_id: str, stage: dict, space: str) -> str:
    """Two snippets: the networks through `from_pretrained` (the pipeline, when the folder is one),
    then what the stage kind says of sampling it with stagediff (`stage`: its raw block)."""
    stage_kind = get_stage_kind(stage["kind"])
    if (folder / "model_index.json").is_file():
        pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
        load = [_imports([pipeline]), "", f'pipe = {pipeline}.from_pretrained("{repo_id}")',
                *stage_kind.card_pipeline_lines(folder, stage)]
    else:
        classes = component_classes(folder)
        load = [_imports(classes.values()), "",
                *(f'{sub} = {name}.from_pretrained("{repo_id}", subfolder="{sub}")' for sub, name in classes.items())]
    return "```python\n" + "\n".join(load) + "\n```\n\n" + stage_kind.card_usage(repo_id, space)


def _imports(class_names) -> str:
    modules: dict[str, list[str]] = {}
    for name in sorted(set(class_names)):
        modules.setdefault(STAGEDIFF_CLASSES.get(name, "diffusers"), []).append(name)
    return "\n".join(f"from {module} import {', '.join(names)}" for module, names in sorted(modules.items()))


def _metrics(folder: Path) -> str:
    parts = []
    if (folder / METRICS_FILE).is_file():
        parts.append(f"Measured at the end of training (`{METRICS_FILE}`):\n\n"
                     + _metrics_table(json.loads((folder / METRICS_FILE).read_text())))
    if (folder / EVALUATION_FILE).is_file():
        report = json.loads((folder / EVALUATION_FILE).read_text())
        if not isinstance(report.get("mean"), dict):
            raise ValueError(f"{(folder / EVALUATION_FILE).resolve()}: not a `stagediff evaluate --out` report "
                             "(no 'mean' mapping of metrics)")
        parts.append(f"Measured by `stagediff evaluate` (`{EVALUATION_FILE}`: sampler {report.get('sampler')}, "
                     f"steps {report.get('steps') or 'default'}, {report.get('num_samples')} samples, mean over "
                     f"{len(report.get('per_seed', [])) or 1} seed(s)):\n\n" + _metrics_table(report["mean"]))
    if not parts:
        return ""
    return "## Metrics\n\nNames as in stagediff's README (Metrics).\n\n" + "\n\n".join(parts)


def _metrics_table(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
             for key, value in metrics.items()]
    return "\n".join(rows)


# --------------------------------------------------------------------------- push


def connect() -> HfApi:
    """A hub client, once a token is found and the endpoint answers within REACH_TIMEOUT_S."""
    if get_token() is None:
        raise HubError("no hub token found: set HF_TOKEN or log in with `hf auth login`")
    api = HfApi()
    print(f"checking that {api.endpoint} answers (timeout {REACH_TIMEOUT_S:g} s)")
    try:
        get_session().head(api.endpoint, timeout=REACH_TIMEOUT_S)  # any answer will do
    except HUB_ERRORS as err:
        raise HubError(f"cannot reach {api.endpoint} ({type(err).__name__}: {err})") from None
    return api


def push(stage_dir: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, license_id: str | None = None, evaluation: Path | None = None,
         include_checkpoints: bool = False, dry_run: bool = False, api=None) -> None:
    """Upload the folder `build_upload_folder` makes from `stage_dir` to the hub repository `repo_id`
    (created if missing, like the branch `revision`), after listing its files with their sizes.

    Args:
        api: an `HfApi`-like client (`create_repo`, `create_branch`, `upload_folder`); default:
            `connect()`. Unused with `dry_run`, which lists and uploads nothing.
    Raises:
        HubError: the hub could not be reached or refused; nothing local is changed.
    """
    check_repo_id(repo_id, "--repo-id")
    with tempfile.TemporaryDirectory(prefix="stagediff-push-") as tmp:
        folder = Path(tmp)
        files = build_upload_folder(stage_dir, repo_id, folder, license_id, evaluation, include_checkpoints)
        sizes = [(folder / p).stat().st_size for p in files]
        print(f"{stage_dir} -> {repo_id} ({'private' if private else 'public'}, branch {revision or 'main'}): "
              f"{len(files)} files, {sum(sizes) / 1e6:.2f} MB")
        print("\n".join(f"{size:>14,}  {path.as_posix()}" for path, size in zip(files, sizes)))
        if dry_run:
            print("dry run: nothing uploaded")
            return
        try:
            api = api if api is not None else connect()
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message or f"Upload stage {stage_dir.name} (stagediff)")
        except (HubError, *HUB_ERRORS) as err:
            raise HubError(f"push of {stage_dir} to {repo_id} failed: {err}; nothing was deleted: "
                           f"retry with `stagediff push {stage_dir} --repo-id {repo_id}`") from None
    print(f"pushed {len(files)} files to {repo_id}: {commit}")
