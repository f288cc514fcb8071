"""data.streaming: local parquet shards read as a stream (datasets' IterableDataset), split by
process, shuffled in blocks, and resumed exactly from a checkpoint; a latent stage trains on a
stream encoded into the latent cache; all offline. Also source `files` without streaming, and the
loader options. The streamed latent cache itself: tests/test_latent_shards.py."""

import io
import json

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stagediff.pipelines.data import DataConfig, StreamBatches, load_data
from stagediff.pipelines.latents import open_cache
from stagediff.pipelines.registry import parse_run_config
from stagediff.pipelines.run import make_accelerator, run
from stagediff.pipelines.trainer import _loader_options

from helpers import tiny_vae_config

SHARDS, PER_SHARD = 3, 24


def png_bytes(value: int) -> bytes:
    """A solid 8x8 grayscale PNG: its pixel value names the item."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Three parquet shards of 24 images each, written by datasets: item values 0..71, in order."""
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for shard in range(SHARDS):
        rows = datasets.Dataset.from_dict(
            {"image": [{"bytes": png_bytes(shard * PER_SHARD + i), "path": None} for i in range(PER_SHARD)]},
            features=datasets.Features({"image": datasets.Image()}))
        paths.append(str(folder / f"train-{shard:05d}.parquet"))
        rows.to_parquet(paths[-1], batch_size=5)  # several record batches per shard
    return paths


def stream_config(files: list[str], **overrides) -> DataConfig:
    return DataConfig(**{"source": "files", "data_files": files, "streaming": True, "resolution": 8,
                         "stream_validation_samples": 8, "shuffle_buffer": 16, **overrides})


def values(batch) -> list[int]:
    return torch.round((batch["x"][:, 0, 0, 0] + 1) * 127.5).long().tolist()


def test_a_stream_holds_out_its_first_items_and_shuffles_the_rest(shards):
    data = load_data(stream_config(shards))
    assert data.description.endswith(": a stream train / 8 validation, 1x8x8, unlabelled")
    assert [int(round((item["x"][0, 0, 0].item() + 1) * 127.5)) for item in data.validation] == list(range(8))
    assert [values({"x": item["x"][None]})[0] for item in data.train] == list(range(8, 72))  # file order
    with pytest.raises(TypeError, match=r"is a stream \(data\.streaming: true\), which has no length"):
        len(data.train)

    epoch = values(next(StreamBatches(data.train, 64, 0, 1, seed=0)))  # one batch: one epoch
    assert sorted(epoch) == list(range(8, 72)) and epoch != sorted(epoch)
    # Two processes read disjoint halves (3 shards: every other item), each shuffled.
    halves = [values(next(StreamBatches(data.train, 32, p, 2, seed=0))) for p in range(2)]
    assert sorted(halves[0] + halves[1]) == list(range(8, 72))


def test_a_resumed_stream_gives_the_same_batches(shards):
    data = load_data(stream_config(shards))
    straight = StreamBatches(data.train, 8, 0, 1, seed=3)
    expected = [values(next(straight)) for _ in range(20)]  # 2.5 epochs of 64 items, in blocks of 16
    assert expected[8:16] != expected[:8]  # another order in the next epoch
    for stop in (3, 8, 13):  # after 24 items (mid-block), 64 (an epoch's end), 104 (mid-block, epoch 1)
        first = StreamBatches(data.train, 8, 0, 1, seed=3)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        first.close()
        resumed = StreamBatches(data.train, 8, 0, 1, seed=3, threads=2)
        resumed.load_state_dict(state)
        assert [values(next(resumed)) for _ in range(20 - stop)] == expected[stop:], stop
        resumed.close()


def test_training_resumed_from_a_checkpoint_equals_an_uninterrupted_run(shards, tmp_path, capsys):
    def config(output_dir, **training):
        raw = tiny_vae_config(output_dir, batch_size=8, lr_scheduler="constant", **training)
        raw["data"] = {"source": "files", "data_files": shards, "streaming": True, "resolution": 8,
                       "stream_validation_samples": 8, "shuffle_buffer": 16}
        raw["stages"][0]["model"]["block_out_channels"] = [8, 8]
        return parse_run_config(raw)

    run(config(tmp_path / "straight", max_steps=10))
    run(config(tmp_path / "halves", max_steps=7, checkpointing_steps=7))  # 56 items: mid-epoch, mid-block
    checkpoint = tmp_path / "halves" / "vae" / "checkpoints" / "checkpoint-7"
    assert json.loads((checkpoint / "data_state.json").read_text())["streams"][0]["offset"] > 0
    run(config(tmp_path / "halves", max_steps=10, resume_from_checkpoint="latest"))
    assert f"resumed from {checkpoint} at step 7" in capsys.readouterr().out
    weights = [load_file(tmp_path / folder / "vae" / "vae" / "diffusion_pytorch_model.safetensors")
               for folder in ("straight", "halves")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_a_latent_stage_trains_on_a_stream_encoded_into_the_latent_cache(shards, tmp_path):
    raw = tiny_vae_config(tmp_path / "run", batch_size=8)
    raw["data"] = {"source": "files", "data_files": shards, "streaming": True, "resolution": 8,
                   "stream_validation_samples": 8, "shuffle_buffer": 16}
    raw["stages"][0]["model"]["block_out_channels"] = [8, 8]
    raw["stages"].append({"name": "ldm", "kind": "ddpm", "input": "vae", "training": {"max_steps": 3, "batch_size": 8},
                          "model": {"block_out_channels": [8, 16], "attention": [False, False], "norm_num_groups": 8,
                                    "num_train_timesteps": 20, "num_inference_steps": 2, "num_eval_samples": 8}})
    results = run(parse_run_config(raw))
    assert results["ldm"]["val_loss"] > 0 and (tmp_path / "run" / "ldm" / "done.json").is_file()
    [cache] = (tmp_path / "run" / "ldm" / "cache").glob("latents-*")
    splits = open_cache(cache)
    # Every training item once (the 64 after the 8 held out), as 2x4x4 latents of the 8x8 images.
    assert (len(splits["train"]), len(splits["validation"])) == (64, 8)
    assert splits["train"].shape == (2, 4, 4) and splits["train"].samples.unique(dim=0).shape[0] == 64


def test_streaming_is_refused_where_it_cannot_work_yet(shards, tmp_path):
    with pytest.raises(ValueError, match=r"data\.streaming=True is invalid: expected false unless data\.source is one "
                                         r"of \['hub', 'files'\] \(here 'mnist'\)"):
        DataConfig(streaming=True)
    labelled = tmp_path / "labelled.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(i), "path": None} for i in range(12)],
                                "label": [i % 2 for i in range(12)]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.ClassLabel(names=["a", "b"])})
                               ).to_parquet(labelled)
    with pytest.raises(ValueError, match=r"data\.label_column='label': .* has class labels, which a stream cannot"):
        load_data(stream_config([str(labelled)]))
    assert len(list(load_data(stream_config([str(labelled)], label_column=None)).train)) == 4
    with pytest.raises(ValueError, match=r"stream_validation_samples=24: .* holds 24 item\(s\) or fewer, which leaves "
                                         r"none for training"):
        load_data(stream_config(shards[:1], stream_validation_samples=24))
    with pytest.raises(FileNotFoundError, match=r"data\.data_files: "):
        load_data(stream_config([str(tmp_path / "missing-*.parquet")]))


def test_files_without_streaming_are_a_map_style_split(shards):
    data = load_data(DataConfig(source="files", data_files=shards, resolution=8, validation_fraction=0.25))
    assert (len(data.train), len(data.validation)) == (54, 18)
    items = [*(data.train[i] for i in range(len(data.train))), *(data.validation[i] for i in range(18))]
    assert sorted(values({"x": torch.stack([item["x"] for item in items])})) == list(range(72))


def test_loader_options_pin_memory_only_for_a_cuda_device(tiny_config):
    config = tiny_config(num_workers=2, prefetch_factor=4)
    accelerator = make_accelerator(config)
    options = _loader_options(config.stages[0].training, accelerator)
    cuda = accelerator.device.type == "cuda"
    assert options == {"num_workers": 2, "pin_memory": cuda, "persistent_workers": True, "prefetch_factor": 4}
    assert accelerator.non_blocking == cuda
    unpinned = tiny_config(pin_memory=False).stages[0].training
    assert _loader_options(unpinned, accelerator) == {"num_workers": 0, "pin_memory": False}
