"""The sharded latent cache (pipelines/latents.py): two real gloo processes encode the same files,
byte for byte, as one; a kill -9 while encoding resumes from the finished shards and never reads a
partial one; reading serves the same batches as an in-memory cache, in DataLoader workers too,
without the process's memory growing with the number of latents.

Damaged, stale and missing shards and manifests: tests/reliability/test_damaged_files.py."""

import json
import multiprocessing
import os
import signal
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import save, save_file
from torch.utils.data import DataLoader

from stagediff.modules.vae import make_autoencoder
from stagediff.pipelines import latents
from stagediff.pipelines.data import DataConfig, DataSplits, InMemoryDataset
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

    written = []
    write_shard = latents._write_shard
    latents._write_shard = lambda path, *args: (written.append(path.name), write_shard(path, *args))
    accelerator = Accelerator(cpu=True)
    for mode in ("mean", "sample"):
        latents.cached_latents(Path(spec["vae"]), synthetic_data(), mode, Path(spec["cache"]) / mode, accelerator,
                               batch_size=16, shard_size=SHARD)
    Path(spec["results"], f"rank{accelerator.process_index}.json").write_text(json.dumps(written))
""")


@pytest.mark.slow
def test_two_gloo_processes_encode_the_same_cache_as_one_bit_for_bit(vae_dir, tmp_path):
    spec = {"vae": str(vae_dir), "cache": str(tmp_path / "two"), "results": str(tmp_path),
            "tests": str(Path(__file__).parent)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(WORKER)
    launched = launch_two_processes(tmp_path / "worker.py", str(tmp_path / "spec.json"))
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    for mode in ("mean", "sample"):
        encode_here(vae_dir, tmp_path / "one" / mode, mode)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(one) == 2 * (7 + 1) and one == two  # every shard and manifest, byte for byte
    # Each process encoded its own shards (round-robin over train-0..4, validation-0..1).
    by_rank = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert by_rank[0] == 2 * ["train-00000.safetensors", "train-00002.safetensors", "train-00004.safetensors",
                              "validation-00001.safetensors"]
    assert by_rank[1] == 2 * ["train-00001.safetensors", "train-00003.safetensors", "validation-00000.safetensors"]
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
