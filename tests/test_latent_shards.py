"""The sharded latent cache (pipelines/latents.py): two real gloo processes encode the same files,
byte for byte, as one, from map-style data and from a stream; a kill -9 while encoding resumes from
the finished shards and never reads a partial one; reading serves the same batches as an in-memory
cache, in DataLoader workers too, without the process's memory growing with the number of latents.
A stream (data.streaming) is encoded in its own order, its unreadable images left out of short
shards, and a resumed encode decodes only the shards it lacks.

Damaged, stale and missing shards and manifests: tests/reliability/test_damaged_files.py."""

import io
import json
import multiprocessing
import os
import re
import signal
import textwrap
from pathlib import Path

import datasets
import numpy as np
import psutil
import pytest
import torch
from accelerate import Accelerator, PartialState
from PIL import Image
from safetensors.torch import save, save_file
from torch.utils.data import DataLoader

from stagediff.modules.vae import make_autoencoder
from stagediff.pipelines import latents
from stagediff.pipelines.data import BadImageError, DataConfig, DataSplits, InMemoryDataset, StreamingImages, \
    load_data, row_key
from stagediff.pipelines.latents import build_cache, cached_latents, open_cache

from test_distributed import launch_two_processes

pytestmark = pytest.mark.usefixtures("single_thread")

SHARD = 64  # items per shard here: 300 training images make 5 shards, 70 validation ones 2


def synthetic_data() -> DataSplits:
    """300 + 70 random 16x16 grayscale images with labels, the same in every process."""
    generator = torch.Generator().manual_seed(0)

    def split(count):
        images = torch.randint(0, 256, (count, 1, 16, 16), dtype=torch.uint8, generator=generator)
        return InMemoryDataset(images, torch.arange(count) % 10)

    return DataSplits(train=split(300), validation=split(70), sample_shape=(1, 16, 16), kind="image",
                      num_classes=10, description="synthetic 16x16", config=DataConfig(resolution=16))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """An untrained tiny AutoencoderKL, 16x16x1 -> 8x8x2 (encoding does not need trained weights)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    make_autoencoder(1, 16, [8, 16], 2, 1, 8).save_pretrained(folder)
    return folder


def write_stream(path: Path, count: int, unreadable: tuple[int, ...] = ()) -> str:
    """A parquet file of `count` random 16x16 grayscale PNGs (the same at every call); the rows at
    `unreadable` hold bytes that are no image, named broken-<row>.png."""
    rng = np.random.default_rng(0)
    rows = []
    for row in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buffer, format="PNG")
        rows.append({"bytes": b"no image %d" % row, "path": f"broken-{row}.png"} if row in unreadable
                    else {"bytes": buffer.getvalue(), "path": None})
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()})
                               ).to_parquet(path)
    return str(path)


def streamed(file: str, **data) -> DataSplits:
    """The parquet file as a stream, its first 4 images held out for validation."""
    return load_data(DataConfig(source="files", data_files=[file], streaming=True, resolution=16,
                                stream_validation_samples=4, **data))


@torch.no_grad()
def encoded_one_by_one(vae_dir: Path, items, mode: str) -> torch.Tensor:
    """The reference: each item's posterior mean (and std, mode "sample") * scaling_factor, encoded alone."""
    vae = latents.load_vae(vae_dir, "cpu")
    posteriors = [vae.encode(item["x"][None]).latent_dist for item in items]
    return torch.cat([p.mean if mode == "mean" else torch.cat([p.mean, p.std], 1) for p in posteriors]
                     ) * vae.config.scaling_factor


def recording(monkeypatch) -> dict[str, list[str]]:
    """The shard files written and the stream entries decoded (by row key), from now on."""
    record = {"written": [], "read": []}
    write_shard, read = latents._write_shard, StreamingImages.read
    monkeypatch.setattr(latents, "_write_shard", lambda path, *args: (record["written"].append(path.name),
                                                                      write_shard(path, *args)))
    monkeypatch.setattr(StreamingImages, "read", lambda self, entry: (record["read"].append(row_key(entry)),
                                                                      read(self, entry))[1])
    return record


def encode_here(vae_dir: Path, cache: Path, mode: str = "mean") -> DataSplits:
    return cached_latents(vae_dir, synthetic_data(), mode, cache, Accelerator(cpu=True), batch_size=16,
                          shard_size=SHARD)


def files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, spec["tests"])
    from accelerate import Accelerator
    from stagediff.pipelines import latents
    from test_latent_shards import SHARD, synthetic_data

    import pytest
    from test_latent_shards import STREAM, recording, streamed

    record = recording(pytest.MonkeyPatch())
    accelerator = Accelerator(cpu=True)
    for mode in ("mean", "sample"):
        latents.cached_latents(Path(spec["vae"]), synthetic_data(), mode, Path(spec["cache"]) / mode, accelerator,
                               batch_size=16, shard_size=SHARD)
    latents.cached_latents(Path(spec["vae"]), streamed(spec["stream"], **STREAM), "mean",
                           Path(spec["cache"]) / "stream", accelerator, batch_size=2, shard_size=5)
    Path(spec["results"], f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
""")


# The stream of the two-process test: 4 validation images, then 17 training ones (row 9, the 6th,
# unreadable): 4 shards of 5 positions, the second holding 4 images, the last 2.
STREAM = {"skip_bad_images": True, "max_bad_fraction": 0.5}
STREAM_ROWS, STREAM_UNREADABLE = 21, (9,)


@pytest.mark.slow
def test_two_gloo_processes_encode_the_same_cache_as_one_bit_for_bit(vae_dir, tmp_path):
    stream = write_stream(tmp_path / "stream.parquet", STREAM_ROWS, STREAM_UNREADABLE)
    spec = {"vae": str(vae_dir), "cache": str(tmp_path / "two"), "results": str(tmp_path),
            "tests": str(Path(__file__).parent), "stream": stream}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(WORKER)
    launched = launch_two_processes(tmp_path / "worker.py", str(tmp_path / "spec.json"))
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    for mode in ("mean", "sample"):
        encode_here(vae_dir, tmp_path / "one" / mode, mode)
    data = streamed(stream, **STREAM)
    with pytest.warns(UserWarning, match="left 1 unreadable image"):
        cached_latents(vae_dir, data, "mean", tmp_path / "one" / "stream", Accelerator(cpu=True), batch_size=2,
                       shard_size=5)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(one) == 2 * (7 + 1) + 4 + 1 + 1 and one == two  # every shard and manifest, byte for byte
    # Each process encoded its own shards (round-robin over train-0..4, validation-0..1; for the
    # stream over train-0..3, validation-0).
    by_rank = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert by_rank[0]["written"] == 2 * ["train-00000.safetensors", "train-00002.safetensors",
                                         "train-00004.safetensors", "validation-00001.safetensors"] + [
        "train-00000.safetensors", "train-00002.safetensors", "validation-00000.safetensors"]
    assert by_rank[1]["written"] == 2 * ["train-00001.safetensors", "train-00003.safetensors",
                                         "validation-00000.safetensors"] + [
        "train-00001.safetensors", "train-00003.safetensors"]
    # Each read the whole stream but decoded only its own shards' entries, once.
    keys = [row_key(entry) for entry in data.train.train_entries()]
    assert len(keys) == 17
    assert by_rank[0]["read"] == keys[0:5] + keys[10:15] and by_rank[1]["read"] == keys[5:10] + keys[15:17]
    # Labels and, for `latents: sample`, the posterior std travel in the shards.
    sample = open_cache(next((tmp_path / "two" / "sample").iterdir()))["train"]
    assert sample.shape == (4, 8, 8) and torch.equal(sample.labels, torch.arange(300) % 10)
    assert (sample.samples[:, 2:] > 0).all()  # std channels


def test_a_kill_while_encoding_resumes_from_the_finished_shards(vae_dir, tmp_path, monkeypatch):
    """kill -9 of a (forked) process while it writes its third shard; the next run encodes only the rest."""
    cache = tmp_path / "killed"

    def encode_until_killed():
        written = []

        def save_then_die(tensors, path, metadata):  # the third shard: part of it lands, then the kill
            if len(written) == 2:
                Path(path).write_bytes(save(tensors, metadata)[:1000])
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(path)
            save_file(tensors, path, metadata=metadata)

        latents.save_file = save_then_die
        encode_here(vae_dir, cache, "sample")

    killed = multiprocessing.get_context("fork").Process(target=encode_until_killed)
    killed.start()
    killed.join(60)
    assert killed.exitcode == -signal.SIGKILL
    [folder] = cache.iterdir()
    left = sorted(path.name for path in folder.iterdir())
    assert left[1:] == ["train-00000.safetensors", "train-00001.safetensors"]  # no manifest
    assert left[0].startswith(".tmp-") and left[0].endswith("-train-00002.safetensors")  # the partial shard

    written = []
    write_shard = latents._write_shard
    monkeypatch.setattr(latents, "_write_shard", lambda path, *args: (written.append(path.name),
                                                                      write_shard(path, *args)))
    resumed = encode_here(vae_dir, cache, "sample")
    assert written == ["train-00002.safetensors", "train-00003.safetensors", "train-00004.safetensors",
                       "validation-00000.safetensors", "validation-00001.safetensors"]
    encode_here(vae_dir, tmp_path / "straight", "sample")
    assert files(cache) == files(tmp_path / "straight")  # the partial file is gone, never read
    assert resumed.sample_shape == (2, 8, 8)


def test_shards_serve_the_batches_of_an_in_memory_cache_in_dataloader_workers(vae_dir, tmp_path):
    shards = encode_here(vae_dir, tmp_path / "cache").train
    memory = InMemoryDataset(shards.samples, shards.labels)
    assert len(shards) == 300 and torch.equal(shards[-1]["x"], memory[299]["x"])
    with pytest.raises(IndexError):
        shards[300]

    def batches(dataset, workers):
        loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(1))
        return [(batch["x"], batch["label"]) for batch in loader]

    for workers in (0, 2):  # workers open their own files (forked: after the parent opened its own)
        for (x, label), (x_memory, label_memory) in zip(batches(shards, workers), batches(memory, workers),
                                                        strict=True):
            assert torch.equal(x, x_memory) and torch.equal(label, label_memory)


def test_reading_every_latent_does_not_grow_resident_memory(tmp_path):
    """100,000 4x8x8 latents (98 MiB) read through the trainer's kind of loader: the resident set
    grows by less than a tenth of the cache (the allocator's own warm-up, a few MiB, which reading an
    in-memory cache shows too; through a memory map it grew by 16 MiB, safe_open's slices 21)."""
    count, shape = 100_000, (4, 8, 8)

    def synthetic(shard):
        n = shard.stop - shard.start
        return torch.arange(shard.start, shard.stop, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *shape), \
            torch.arange(shard.start, shard.stop)

    build_cache(tmp_path / "cache", {"key": "synthetic"}, {"train": count, "validation": 1}, synthetic,
                PartialState(cpu=True))
    train = open_cache(tmp_path / "cache")["train"]
    cache_bytes = sum(path.stat().st_size for path in (tmp_path / "cache").glob("train-*"))
    batches = iter(DataLoader(train, batch_size=250, shuffle=True, generator=torch.Generator().manual_seed(0)))
    first = next(batches)  # the sampler's permutation of the indices (3.6 MB as a list) is made here
    assert torch.equal(first["x"][:, 0, 0, 0].long(), first["label"])
    before = psutil.Process().memory_info().rss
    seen = len(first["x"]) + sum(len(batch["x"]) for batch in batches)
    grown = psutil.Process().memory_info().rss - before
    assert seen == count and grown < cache_bytes / 10, f"{grown / 2 ** 20:.1f} MiB of {cache_bytes / 2 ** 20:.0f}"


@pytest.mark.parametrize("mode", ["mean", "sample"])
def test_a_stream_is_cached_in_its_own_order(vae_dir, tmp_path, mode):
    data = streamed(write_stream(tmp_path / "stream.parquet", 21), max_train_samples=13)  # of the 17 after the 4
    cache = cached_latents(vae_dir, data, mode, tmp_path / "cache", Accelerator(cpu=True), batch_size=1, shard_size=5)
    assert [shard["count"] for shard in json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())[
        "splits"]["train"]["shards"]] == [5, 5, 3]
    assert torch.equal(cache.train.samples, encoded_one_by_one(vae_dir, data.train, mode))
    assert torch.equal(cache.validation.samples, encoded_one_by_one(vae_dir, data.validation, mode))
    assert torch.equal(cache.train.labels, torch.full((13,), -1))
    assert cache.sample_shape == (2, 8, 8) and cache.train.shape == ((4 if mode == "sample" else 2), 8, 8)


def test_short_shards_of_a_stream_map_every_index_to_its_item(vae_dir, tmp_path):
    """Shards of 3 over 14 training images, 4 of them unreadable: counts 3, 2, 0 (all unreadable), 3, 2."""
    stream = write_stream(tmp_path / "stream.parquet", 18, unreadable=(8, 10, 11, 12))
    data = streamed(stream, skip_bad_images=True, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match=r"left 4 unreadable image\(s\) of its 14 training images out of the latent "
                                         r"cache in .*: broken-10\.png, broken-11\.png, broken-12\.png, \.\.\."):
        train = cached_latents(vae_dir, data, "mean", tmp_path / "cache", Accelerator(cpu=True), batch_size=1,
                               shard_size=3).train
    assert train.starts == [0, 3, 5, 5, 8, 10]  # each shard's first index, then the count
    expected = encoded_one_by_one(vae_dir, data.train, "mean")
    assert len(train) == len(expected) == 10 and torch.equal(train.samples, expected)
    assert all(torch.equal(train[index]["x"], expected[index]) for index in range(-10, 10))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(torch.stack([item["x"] for item in train.__getitems__(order)]), expected[order])
    with pytest.raises(IndexError):
        train[10]
    # More than max_bad_fraction unreadable: an error naming them; without skip_bad_images, the first.
    with pytest.raises(ValueError, match=r"at least 4 of its 14 training images are unreadable \(28\.6%\), more than "
                                         r"data\.max_bad_fraction=0\.2: broken-10\.png"):
        cached_latents(vae_dir, streamed(stream, skip_bad_images=True, max_bad_fraction=0.2), "mean",
                       tmp_path / "cache", Accelerator(cpu=True), shard_size=3)
    with pytest.raises(BadImageError, match=r"^broken-8\.png: cannot read image"):
        cached_latents(vae_dir, streamed(stream), "mean", tmp_path / "cache", Accelerator(cpu=True), shard_size=3)


def test_a_resumed_stream_encode_decodes_only_the_shard_it_lacks(vae_dir, tmp_path, monkeypatch):
    data = streamed(write_stream(tmp_path / "stream.parquet", 21, unreadable=(9,)), skip_bad_images=True)
    accelerator = Accelerator(cpu=True)

    def encode():
        return cached_latents(vae_dir, data, "mean", tmp_path / "cache", accelerator, batch_size=2, shard_size=5)

    with pytest.warns(UserWarning, match="left 1 unreadable image"):
        encode()
    [folder] = (tmp_path / "cache").iterdir()
    straight = files(folder)
    (folder / "train-00001.safetensors").unlink()
    (folder / "train-00009.safetensors").write_bytes(b"of a longer stream")  # no shard of this cache
    record = recording(monkeypatch)
    with pytest.warns(UserWarning, match="left 1 unreadable image"), pytest.warns(
            UserWarning, match=rf"latent cache shard {re.escape(str(folder))}/train-00001\.safetensors is missing; "
                               "encoding it again"):
        encode()
    keys = [row_key(entry) for entry in data.train.train_entries()]
    assert record == {"written": ["train-00001.safetensors"], "read": keys[5:10]}
    assert files(folder) == straight


def test_a_stream_whose_items_all_repeat_its_validation_ones_has_no_training_item(vae_dir, tmp_path):
    once = datasets.Dataset.from_parquet(write_stream(tmp_path / "once.parquet", 4))
    datasets.concatenate_datasets([once, once]).to_parquet(tmp_path / "twice.parquet")
    with pytest.raises(ValueError, match=r"the stream has no training item: every item after its first 4 \(the "
                                         r"validation split\) repeats one of them"):
        cached_latents(vae_dir, streamed(str(tmp_path / "twice.parquet")), "mean", tmp_path / "cache",
                       Accelerator(cpu=True))
