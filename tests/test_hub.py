"""Pushing a trained stage to a hub, offline: the upload folder and its model card, what the
client receives, the dry run, and hub failures (huggingface_hub's own offline and no-token paths)."""

import contextlib
import io
import json
import re
import runpy
import socket
import sys
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import yaml
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL
from huggingface_hub import HfApi, ModelCard

from stagediff.pipelines.cli import main
from stagediff.pipelines.config import ConfigError
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.hub import HubError, build_upload_folder, push
from stagediff.pipelines.run import run

from helpers import tiny_vae_config

REPO_ID = "someone/tiny-ldm"
PLANTED_TOKEN = "hf_PlantedFakeToken0123456789abcdefXYZ"
SCRIPT = Path(__file__).parents[1] / "scripts" / "push_to_hub.py"
# What a push of the latent DDPM stage uploads, and nothing else.
LDM_UPLOAD = {"README.md", "config.yaml", "done.json", "evaluation.json", "metrics.json", "model_index.json",
              "samples.png", "stagediff.json", "scheduler/scheduler_config.json", "unet/config.json",
              "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors"}
# A `stagediff evaluate --out` report (the keys cli.evaluate_command writes).
EVALUATION = {"model_dir": "runs/x/ldm", "sampler": "ddim", "steps": 50, "num_samples": 16,
              "mean": {"fd": 12.345678, "classes_covered": 7.0}, "per_seed": [{"seed": 0}, {"seed": 1}]}


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """A VAE and a latent DDPM trained a few steps with `push_to_hub: true`, offline and with a
    planted token: training finishes, then the push fails. Returns (config, error, output)."""
    raw = tiny_vae_config(tmp_path_factory.mktemp("hub") / "run", max_steps=1)
    raw.update(push_to_hub=True, hub_model_id=REPO_ID)
    raw["stages"].append({"name": "ldm", "kind": "ddpm", "input": "vae",
                          "model": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 8,
                                    "num_train_timesteps": 100, "num_inference_steps": 5, "num_eval_samples": 16},
                          "training": {"max_steps": 1, "batch_size": 16, "checkpointing_steps": 1}})
    config = parse_run_config(raw)
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        mp.setenv("HF_TOKEN", PLANTED_TOKEN)
        with pytest.raises(HubError) as error:
            run(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    Path(config.output_dir, "ldm", "evaluation.json").write_text(json.dumps(EVALUATION))
    return config, str(error.value), output.getvalue()


@pytest.fixture(autouse=True)
def planted_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)


def ldm_dir(staged_run) -> Path:
    return Path(staged_run[0].output_dir) / "ldm"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def card_parts(card: str) -> tuple[dict, str]:
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


class RecordingHub:
    """An HfApi-like client that records its calls and the files it is handed."""

    def __init__(self):
        self.calls, self.files, self.uploads = [], {}, []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.uploads.append((kwargs["commit_message"], self.files))
        return "recorded-commit"


def test_upload_folder_keeps_weights_configs_card_and_images_only(staged_run, tmp_path):
    stage = ldm_dir(staged_run)
    local = set(snapshot(stage))
    # The stage folder has what must stay local: optimizer states, the latent cache, the history.
    assert {"checkpoints/checkpoint-1/optimizer.bin", "history.jsonl"} <= local
    assert any(p.startswith("cache/latents-") for p in local)

    files = build_upload_folder(stage, REPO_ID, tmp_path / "default")
    assert {p.as_posix() for p in files} == LDM_UPLOAD
    for path in LDM_UPLOAD - {"README.md"}:
        assert (tmp_path / "default" / path).read_bytes() == (stage / path).read_bytes()

    with_checkpoints = {p.as_posix() for p in build_upload_folder(stage, REPO_ID, tmp_path / "ckpt",
                                                                  include_checkpoints=True)}
    assert with_checkpoints - LDM_UPLOAD == {p for p in local if p.startswith("checkpoints/checkpoint-1/")}
    assert "checkpoints/checkpoint-1/optimizer.bin" in with_checkpoints


def test_model_card_has_hub_metadata_pipeline_metrics_and_samples(staged_run, tmp_path):
    stage = ldm_dir(staged_run)
    build_upload_folder(stage, REPO_ID, tmp_path)
    card = (tmp_path / "README.md").read_text()
    metadata, body = card_parts(card)
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "mit"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "unconditional-image-generation", "stagediff", "ddpm", "latent-diffusion"} \
        <= set(metadata["tags"])
    assert "datasets" not in metadata  # the embedded MNIST digits do not come from the hub
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "diffusers"  # the hub's own parser

    assert "| vae | vae |  | 1 | 16 | 0.001 |" in body and "| ldm | ddpm | vae | 1 | 16 | 0.0001 |" in body
    assert "`unet/`: `UNet2DModel`" in body and "`vae/`: `AutoencoderKL`" in body
    metrics = json.loads((stage / "metrics.json").read_text())
    assert f"| fd | {metrics['fd']:.4g} |" in body and f"| val_loss | {metrics['val_loss']:.4g} |" in body
    assert "sampler ddim, steps 50, 16 samples, mean over 2 seed(s)" in body and "| fd | 12.35 |" in body
    assert "![samples.png](samples.png)" in body
    assert "num_train_timesteps: 100" in body  # the training config

    other = tmp_path / "other-evaluation.json"
    other.write_text(json.dumps({**EVALUATION, "mean": {"fd": 3.0}}))
    build_upload_folder(stage, REPO_ID, tmp_path / "other", license_id="apache-2.0", evaluation=other)
    metadata, body = card_parts((tmp_path / "other" / "README.md").read_text())
    assert metadata["license"] == "apache-2.0" and "| fd | 3 |" in body and "| fd | 12.35 |" not in body
    assert json.loads((tmp_path / "other" / "evaluation.json").read_text())["mean"] == {"fd": 3.0}
    with pytest.raises(FileNotFoundError, match="--evaluation: .*missing.json: no such file"):
        build_upload_folder(stage, REPO_ID, tmp_path / "missing", evaluation=tmp_path / "missing.json")


def test_model_card_names_hub_datasets(staged_run, tmp_path):
    stage = tmp_path / "vae"
    vae_dir = Path(staged_run[0].output_dir) / "vae"
    config = yaml.safe_load((vae_dir / "config.yaml").read_text())
    config["data"].update(source="hub", dataset_name="ylecun/mnist")
    stage.mkdir()
    (stage / "config.yaml").write_text(yaml.safe_dump(config))
    build_upload_folder(stage, "someone/vae", tmp_path / "up")
    metadata, body = card_parts((tmp_path / "up" / "README.md").read_text())
    assert metadata["datasets"] == ["ylecun/mnist"] and "vae" in metadata["tags"]
    assert "[`ylecun/mnist`](https://huggingface.co/datasets/ylecun/mnist)" in body


def test_the_cards_usage_loads_the_upload_folder_with_from_pretrained(staged_run, tmp_path):
    config = staged_run[0]
    build_upload_folder(ldm_dir(staged_run), REPO_ID, tmp_path / "ldm")
    load, sample = python_blocks((tmp_path / "ldm" / "README.md").read_text())
    assert "LatentDiffusionPipeline.from_pretrained" in load
    scope = {}
    exec(load.replace(REPO_ID, str(tmp_path / "ldm")), scope)
    assert len(scope["images"]) == 16 and scope["images"][0].size == (16, 16)
    scope = {}
    exec(sample.replace(f'snapshot_download("{REPO_ID}")', repr(str(tmp_path / "ldm"))), scope)
    assert scope["x"].shape == (16, 1, 16, 16) and scope["x"].abs().max() <= 1

    build_upload_folder(Path(config.output_dir) / "vae", "someone/vae", tmp_path / "vae")
    load, _ = python_blocks((tmp_path / "vae" / "README.md").read_text())
    scope = {}
    exec(load.replace("someone/vae", str(tmp_path / "vae")), scope)
    original = AutoencoderKL.from_pretrained(Path(config.output_dir) / "vae" / "vae")
    assert isinstance(scope["vae"], AutoencoderKL)
    assert scope["vae"].config.scaling_factor == original.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(scope["vae"].state_dict().values(), original.state_dict().values()))


def test_push_hands_the_client_exactly_the_upload_folder(staged_run, tmp_path, capsys):
    stage = ldm_dir(staged_run)
    before = snapshot(stage)
    expected = {p.as_posix() for p in build_upload_folder(stage, REPO_ID, tmp_path)}
    hub = RecordingHub()
    push(stage, REPO_ID, private=True, revision="v1", commit_message="first", api=hub)

    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": REPO_ID, "private": True, "exist_ok": True}
    assert hub.calls[1][1] == {"repo_id": REPO_ID, "branch": "v1", "exist_ok": True}
    upload = hub.calls[2][1]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == (REPO_ID, "v1", "first")
    assert set(hub.files) == expected == LDM_UPLOAD
    assert hub.files["unet/diffusion_pytorch_model.safetensors"] == \
        (stage / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert hub.files["README.md"] == (tmp_path / "README.md").read_bytes()
    assert not Path(upload["folder_path"]).exists()  # the staging folder is temporary
    assert snapshot(stage) == before
    assert f"pushed 13 files to {REPO_ID}: recorded-commit" in capsys.readouterr().out


def test_dry_run_lists_every_file_with_its_size_and_uploads_nothing(staged_run, tmp_path, monkeypatch, capsys):
    stage = ldm_dir(staged_run)
    build_upload_folder(stage, REPO_ID, tmp_path)
    # The script, given the run folder, pushes its last stage.
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), staged_run[0].output_dir, "--repo-id", REPO_ID, "--dry-run"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    listed = dict(reversed(line.split()) for line in out.splitlines() if line.startswith(" "))
    assert set(listed) == LDM_UPLOAD
    for path, size in listed.items():
        assert int(size.replace(",", "")) == (tmp_path / path).stat().st_size, path
    assert f"{stage} -> {REPO_ID} (public, branch main): 13 files" in out and "dry run: nothing uploaded" in out
    assert "checking" not in out  # no hub contacted

    hub = RecordingHub()
    push(stage, REPO_ID, dry_run=True, api=hub)
    assert hub.calls == []


def test_hub_errors_end_with_a_clear_message_and_delete_nothing(staged_run, tmp_path, monkeypatch, capsys):
    stage = ldm_dir(staged_run)
    before = snapshot(stage)
    # Offline (HF_HUB_OFFLINE=1 from conftest): huggingface_hub refuses the reachability check at once.
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(stage), "--repo-id", REPO_ID])
    message = str(exit_info.value.code)
    assert message.startswith(f"stagediff push: error: push of {stage} to {REPO_ID} failed: cannot reach")
    assert "offline mode is enabled" in message and "nothing was deleted" in message
    assert "checking that https://huggingface.co answers (timeout 5 s)" in capsys.readouterr().out

    # A real client, offline: create_repo fails inside huggingface_hub.
    with pytest.raises(HubError, match="offline mode is enabled"):
        push(stage, REPO_ID, api=HfApi())

    # The network down: nothing listens at the endpoint, the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with monkeypatch.context() as online:
        online.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        online.setattr(huggingface_hub.constants, "ENDPOINT", closed)
        with pytest.raises(SystemExit, match=f"cannot reach {closed} \\(ConnectError"):
            main(["push", str(stage), "--repo-id", REPO_ID])

    # No token anywhere (environment or cached login).
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(stage), "--repo-id", REPO_ID])
    assert "no hub token found: set HF_TOKEN or log in with `hf auth login`" in str(exit_info.value.code)

    with pytest.raises(SystemExit, match=r"--repo-id: 'tiny-ldm' is not a valid hub repository id; expected USER/NAME"):
        main(["push", str(stage), "--repo-id", "tiny-ldm", "--dry-run"])
    assert snapshot(stage) == before


def test_push_to_hub_in_a_training_config(staged_run, tmp_path):
    config, error, _ = staged_run
    # The run trained every stage, then pushed its last one and reported the hub's refusal.
    assert all((Path(config.output_dir) / name / "done.json").is_file() for name in ("vae", "ldm"))
    assert error.startswith(f"push of {Path(config.output_dir) / 'ldm'} to {REPO_ID} failed: cannot reach")
    assert f"retry with `stagediff push {Path(config.output_dir) / 'ldm'} --repo-id {REPO_ID}`" in error

    raw = tiny_vae_config(tmp_path)
    with pytest.raises(ConfigError, match=r"hub_model_id: None is not valid; expected a hub repository id USER/NAME "
                                          r"when push_to_hub is true"):
        parse_run_config({**raw, "push_to_hub": True})
    with pytest.raises(ConfigError, match=r"hub_model_id: 'a/b/c' is not a valid hub repository id"):
        parse_run_config({**raw, "hub_model_id": "a/b/c"})
    assert parse_run_config({**raw, "hub_model_id": "me/model", "hub_private": True}).hub_private


def test_push_every_checkpoint_commits_the_weights_of_each_checkpoint(tmp_path):
    raw = tiny_vae_config(tmp_path / "run", max_steps=2, checkpointing_steps=1)
    raw.update(push_to_hub=True, push_every_checkpoint=True, hub_model_id=REPO_ID)
    hub = RecordingHub()
    run(parse_run_config(raw), hub_api=hub)
    assert [message for message, _ in hub.uploads] == [
        "vae: checkpoint at step 1 (stagediff)", "vae: checkpoint at step 2 (stagediff)", "Upload stage vae (stagediff)"]
    weights = "vae/diffusion_pytorch_model.safetensors"
    for _, files in hub.uploads[:2]:  # a loadable model with its card, config and weights
        assert {"README.md", "config.yaml", "vae/config.json", weights} <= set(files)
        assert "library_name: diffusers" in files["README.md"].decode()
    step_1, step_2, final = (safetensors.torch.load(files[weights]) for _, files in hub.uploads)
    assert all(torch.equal(step_2[key], final[key]) for key in final)  # step 2 is the end of training
    assert not all(torch.equal(step_1[key], final[key]) for key in final)  # step 1 is not
    with pytest.raises(ConfigError, match=r"push_every_checkpoint: True is not valid; expected false unless "
                                          r"push_to_hub is true"):
        parse_run_config({**tiny_vae_config(tmp_path), "push_every_checkpoint": True})


def test_the_token_is_never_written_or_printed(staged_run, tmp_path, capsys):
    config, error, run_output = staged_run
    stage = ldm_dir(staged_run)
    hub = RecordingHub()
    push(stage, REPO_ID, api=hub)
    push(stage, REPO_ID, dry_run=True, include_checkpoints=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(stage), "--repo-id", REPO_ID])
    build_upload_folder(stage, REPO_ID, tmp_path)

    token = PLANTED_TOKEN.encode()
    written = [p for folder in (Path(config.output_dir), tmp_path) for p in folder.rglob("*") if p.is_file()]
    assert len(written) > 20
    assert not [p for p in written if token in p.read_bytes()]
    assert not [name for name, data in hub.files.items() if token in data]
    outputs = [run_output, error, str(exit_info.value.code), *capsys.readouterr()]
    assert "offline mode is enabled" in outputs[2]
    assert not [text for text in outputs if PLANTED_TOKEN in text]
