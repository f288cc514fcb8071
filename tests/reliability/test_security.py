"""Security: weights only as safetensors, every torch.load with weights_only=True, no eval/exec,
pickle or remote code; a hub token in the environment never reaches a file a run writes; names in a
dataset cannot make a run write outside its output folder."""

import importlib.util
import io
import tokenize
from pathlib import Path

import pytest
import torch
from PIL import Image

from stagediff.pipelines.cli import main

from helpers import tiny_vae_config

from .helpers import FAKE_TOKEN, files_containing, snapshot, toy_ddpm_config, train, write_config

ROOT = Path(__file__).parents[2]
SOURCES = sorted(p for folder in ("modules", "pipelines", "scripts") for p in (ROOT / folder).rglob("*.py"))
UNPICKLING = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}
# What accelerate pickles into our own checkpoints (optimizer, LR schedule, RNG states), read back
# with weights_only=True; the weights themselves are safetensors there too.
CHECKPOINT_PICKLES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}


def unsafe_calls(source: str) -> list[str]:
    """The unsafe constructs in Python `source`, found on its tokens (comments and strings ignored)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER)]
    words = [t.string for t in tokens]
    found = []
    for i, word in enumerate(words):
        before, after = words[i - 1] if i else "", words[i + 1:i + 2]
        where = f"line {tokens[i].start[0]}"
        if word in UNPICKLING and before != ".":
            found.append(f"{where}: {word}")
        elif word in ("eval", "exec", "__import__") and before != "." and after == ["("]:
            found.append(f"{where}: {word}()")
        elif word == "trust_remote_code":
            found.append(f"{where}: trust_remote_code")
        elif word == "safe_serialization" and words[i + 1:i + 3] == ["=", "False"]:
            found.append(f"{where}: safe_serialization=False")
        elif before == "." and words[i - 2:i - 1] == ["yaml"] and word in ("load", "unsafe_load", "full_load"):
            found.append(f"{where}: yaml.{word}")
        elif before == "." and words[i - 2:i - 1] == ["torch"] and word == "save":
            found.append(f"{where}: torch.save")
        elif before == "." and words[i - 2:i - 1] == ["torch"] and word == "load":
            depth, call = 0, []
            for token in words[i + 1:]:
                depth += {"(": 1, ")": -1}.get(token, 0)
                call.append(token)
                if depth == 0:
                    break
            if "".join(call).find("weights_only=True") < 0:
                found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_the_scanner_finds_each_unsafe_construct():
    planted = ("import pickle\nx = eval('1')\nexec(code)\nmodel.eval()\nm = f(trust_remote_code=True)\n"
               "torch.load(path)\ntorch.load(path, weights_only=True)\nyaml.load(text)\nyaml.safe_load(text)\n"
               "torch.save(obj, path)\nv.save_pretrained(d, safe_serialization=False)\n"
               "# pickle, eval(x) in a comment\n")
    assert unsafe_calls(planted) == [
        "line 1: pickle", "line 2: eval()", "line 3: exec()", "line 5: trust_remote_code",
        "line 6: torch.load without weights_only=True", "line 8: yaml.load", "line 10: torch.save",
        "line 11: safe_serialization=False"]


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_the_code_has_no_unsafe_loading_or_evaluation(path):
    assert unsafe_calls(path.read_text()) == []


def test_resuming_reads_pickled_states_only_with_weights_only(tmp_path, monkeypatch):
    train(toy_ddpm_config(tmp_path / "run", max_steps=2, checkpointing_steps=2))
    calls, load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(toy_ddpm_config(tmp_path / "run", max_steps=4, resume_from_checkpoint="latest"))
    assert len(calls) == len(CHECKPOINT_PICKLES) and all(weights_only is True for weights_only in calls)


def test_weights_are_written_only_as_safetensors(trained_vae, tmp_path):
    train(toy_ddpm_config(tmp_path / "run", max_steps=2, checkpointing_steps=2))
    for run in (tmp_path / "run", Path(trained_vae["output_dir"])):
        exported = [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
        assert {p.suffix for p in exported} <= {".safetensors", ".json", ".yaml", ".png", ".jsonl"}, exported
    checkpoint = tmp_path / "run" / "ddpm" / "checkpoints" / "checkpoint-2"
    pickled = {p.name for p in checkpoint.iterdir() if p.suffix not in (".safetensors", ".json", ".yaml")}
    assert pickled == CHECKPOINT_PICKLES


def test_a_hub_token_in_the_environment_never_reaches_a_file_or_the_output(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    raw = toy_ddpm_config(tmp_path / "run", max_steps=4, checkpointing_steps=2, sample_every=2, max_nonfinite_skips=1)
    raw["log_with"] = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"  # event files too
    train(raw)
    assert not files_containing(tmp_path / "run", FAKE_TOKEN)
    out, err = capfd.readouterr()
    assert FAKE_TOKEN not in out + err


def test_dataset_file_names_cannot_make_a_run_write_elsewhere(tmp_path):
    data = tmp_path / "data"
    # '/' cannot be in a file name; everything else that looks like a way out can.
    names = ["..png", "...png", "..%2F..%2Fescape.png", "..\\..\\escape.png", "-rf.png", "a b.png", "ünïcode.png",
             "$(touch x).png"]
    # Class folders named like parent references (names starting with '.' are hidden, which datasets skips).
    for label in ("plain", "...", "..cls", "..\\..", "-"):
        (data / label).mkdir(parents=True)
        for index, name in enumerate(names):
            Image.new("L", (8, 8), 30 * index).save(data / label / name, format="PNG")
    for index in range(32):  # enough visible ones for the VAE's 16-image preview of the validation split
        Image.new("L", (8, 8), 7 * index).save(data / "plain" / f"{index}.png")
    raw = tiny_vae_config(tmp_path / "out", max_steps=2, batch_size=4)
    raw["data"] = {"source": "imagefolder", "train_data_dir": str(data), "resolution": 8, "validation_fraction": 0.5}
    config = write_config(tmp_path / "run.yaml", raw)
    outside = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")}
    main(["train", "--config", str(config)])
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == outside
    out = (tmp_path / "out").resolve()
    assert all(p.resolve().is_relative_to(out) for p in out.rglob("*"))
