"""The stage-1 VAE as later stages use it: loading it, decoding its prior and latents, and
latent caching for stage 2 (encode the dataset once with the frozen VAE, train from disk).

A latent cache is a folder named by a hash of what made it (`cache_key`: the VAE's weights and
config, the data config, for an image folder or data files also their files' names, sizes and
times, the latent mode and the cache layout), holding fixed-size shards and a manifest:

    cache/latents-<key16>/train-00000.safetensors, train-00001..., validation-00000..., manifest.json

- **Shards.** A split is cut into shards of SHARD_ITEMS consecutive items (the last one shorter),
  whatever the number of processes. A shard holds `latents` (N, C, H, W) float32, z *
  scaling_factor (`latents: sample`: [mean, std] * scaling_factor on the channel axis), and
  `labels` (N,) int64; its header names the cache key, the split, the positions it covers
  (start..stop-1), its count, the unreadable images it left out, and the SHA-256 of its tensors.
- **Streams** (data.streaming): the train split is encoded as it is read (`StreamShards`). Its
  shard s covers positions s * SHARD_ITEMS .. (s + 1) * SHARD_ITEMS - 1 of the stream's training
  entries, in the source's own order (the validation items left out); its unreadable images are
  left out of it (data.skip_bad_images; else an error naming the file), so a shard may hold fewer
  items than it covers, and the cache warns, naming them, at every run that reads it. Positions
  fix each shard's bounds without the count of any shard before it, so the shards are cut,
  checked and resumed as a map-style split's are; only their number waits for the stream's end.
  The key holds the data config (and the data files' names, sizes and times), not the items: a
  hub dataset that changes under the same config is not noticed.
- **Encoding, by every process.** Process r of P encodes shards r, r + P, ... (counted across
  the splits): each shard alone, in batches that start at its first item, with the VAE in eval
  mode and nothing random. Shard bounds and batches depend on the data alone, so 1 and P
  processes write the same files byte for byte. A stream is read whole by every process, its
  entries undecoded but for its own shards' (skipping an entry costs the SHA-256 of its bytes,
  which tells the validation items apart). Each shard is written under a temporary name and
  renamed into place. When every process is done, the main process deletes what is no shard of
  the cache and writes manifest.json, last and the same way: every shard with its count, size,
  SHA-256 and where its tensors start in the file.
- **Checking, at every run.** Each process checks its own shards in full: the header against the
  key and the manifest, and the SHA-256 of the tensor bytes, streamed (1.7 GB/s on this project's
  CPU: 0.6 s for a million 4x8x8 latents, 1 GiB, split between the processes). That is the price
  of never training on a flipped bit, small beside training on a million latents; checking only
  sizes and headers would miss a flipped bit. A missing, truncated, corrupted or stale shard is
  named in a warning and encoded again; the others are kept, so a killed encode resumes from its
  finished shards, and what a kill leaves under a temporary name is deleted, never read. A
  retrained VAE or changed data has another key: stale latents are never reused.
- **Reading.** `LatentShards` finds an item's shard from the shards' counts (bisect: a stream's
  shards may be short), and reads items from the shard files with positioned reads
  (`os.preadv`, one per item, a batch at a time through `__getitems__`), not from a memory map:
  the pages of a map that reading touches count to the process's resident memory, while the page
  cache that pread goes through is the kernel's. One shuffled epoch over 100,000 4x8x8 latents
  (98 MiB) grew the resident set by 16 MiB through `np.memmap`, 21 MiB through safetensors'
  `safe_open(...).get_slice`, nothing through pread (read in order, a map grows by all 98). Nothing
  of a split is held in memory, so a training process's memory does not grow with the number of
  cached latents (`stagediff benchmark --data-only` measures it: benchmarks/data.py).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import resource
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce
from diffusers import AutoencoderKL
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch.utils.data import Dataset, default_collate

from .checkpoint import hash_file
from .data import BadImageTally, DataConfig, DataSplits, StreamingImages

CACHE_LAYOUT = "3"  # bump when what a cache holds changes (2: shards and a manifest; 3: streams)
SHARD_ITEMS = 4096  # items per shard; 4x8x8 float32 latents: 4 MiB
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
# Files a reader keeps open per process: a quarter of the soft limit on open files (1,024 by
# default: 256 shards, a million 4x8x8 latents). Reopening a file per read halved the loader's speed.
OPEN_SHARDS = max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
SHARD_HEADER_KEY = "latent_shard"
_MAX_HEADER_BYTES = 100 * 2 ** 20  # safetensors' own limit


def load_vae(vae_dir: Path, device) -> AutoencoderKL:
    """An exported (stage 1) VAE, in eval mode on `device`."""
    return AutoencoderKL.from_pretrained(vae_dir).to(device).eval()


@torch.no_grad()
def decode_prior(autoencoder: AutoencoderKL, num_samples: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """x_hat(z) for z ~ N(0, I): the VAE's own generative model (mean of p(x|z))."""
    shape = (num_samples, *latent_shape(autoencoder.config))
    z = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
    return autoencoder.decode(z).sample.clamp(-1, 1)


def latent_shape(config) -> tuple[int, int, int]:
    """(C, H, W) of the latents of a VAE with this config: each down block but the last halves the side."""
    size = config.sample_size // 2 ** (len(config.block_out_channels) - 1)
    return config.latent_channels, size, size


def cache_key(vae_dir: Path, data: DataSplits, mode: str) -> str:
    """SHA-256 of everything the cached latents depend on. A stream's description is the same
    whatever its items: its data files' names, sizes and times stand for them."""
    digest = hashlib.sha256(f"{CACHE_LAYOUT}|{mode}|{data.description}|".encode())
    digest.update(json.dumps(dataclasses.asdict(data.config), sort_keys=True).encode())
    for name, path in _data_files(data.config):
        stat = path.stat()
        digest.update(f"|{name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for name in ("config.json", SAFETENSORS_WEIGHTS_NAME):
        hash_file(vae_dir / name, digest)
    return digest.hexdigest()


def _data_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(name, path) of the local files an image folder or data files source reads, sorted by name."""
    if cfg.source == "imagefolder":
        root = Path(cfg.train_data_dir)
        return sorted((str(path.relative_to(root)), path) for path in root.rglob("*") if path.is_file())
    if cfg.source == "files":
        return sorted((name, Path(name)) for name in {name for pattern in cfg.data_files
                                                      for name in glob.glob(pattern, recursive=True)})
    return []


def cached_latents(vae_dir: Path, data: DataSplits, mode: str, cache_dir: Path, accelerator: Accelerator,
                   batch_size: int = 256, shard_size: int = SHARD_ITEMS) -> DataSplits:
    """Latent splits of `data`: z * scaling_factor (mode "mean"), or [mean, std] * scaling_factor
    stacked on the channel axis (mode "sample": the training step draws z = mean + std * eps),
    read from the sharded cache in `cache_dir`, which every process helps to encode and check. A
    streamed train split (`StreamingImages`) is encoded as it is read, into map-style shards."""
    key = cache_key(vae_dir, data, mode)
    folder = cache_dir / f"latents-{key[:16]}"
    vae = functools.cache(lambda: load_vae(vae_dir, accelerator.device))  # only where a shard needs encoding
    splits = {split: StreamShards(dataset) if isinstance(dataset, StreamingImages) else len(dataset)
              for split, dataset in ((split, getattr(data, split)) for split in SPLITS)}

    def encode(shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        if shard.streamed:
            items = splits[shard.split].items()
        else:
            dataset = getattr(data, shard.split)
            items = (dataset[index] for index in range(shard.start, shard.stop))
        return _encode(vae(), items, mode, batch_size)

    info = {"key": key, "vae_dir": str(vae_dir), "mode": mode, "data": data.description}
    manifest = build_cache(folder, info, splits, encode, accelerator, shard_size)
    _check_left_out(manifest, data.config, folder, accelerator.is_main_process)
    train, validation = (LatentShards(folder, manifest, split) for split in SPLITS)
    channels = train.shape[0] // (2 if mode == "sample" else 1)
    return DataSplits(
        train=train,
        validation=validation,
        sample_shape=(channels, *train.shape[1:]),
        kind="latent",
        num_classes=data.num_classes,
        description=f"latents {channels}x{train.shape[1]}x{train.shape[2]} of {data.description}",
        config=data.config,
    )


@dataclasses.dataclass(frozen=True)
class Shard:
    """Positions start..stop-1 of a split: shard `index` of SHARD_ITEMS (or the cache's shard
    size). A planned shard (map-style data) holds an item for each position; a `streamed` one
    leaves out the unreadable images, and the stop of a stream's last shard lies past its end."""

    split: str
    index: int
    start: int
    stop: int
    streamed: bool = False

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.safetensors"

    def header(self, info: dict[str, str], count: int, left_out: list[str]) -> dict:
        return {**info, "split": self.split, "start": self.start, "stop": self.stop, "count": count,
                "left_out": left_out}


class PlannedShards:
    """A map-style split of `count` items: its shards are planned from the count before anything is read.

    `own(split, shard_size, process, processes)` gives the shards of `process`; then `shards` is
    every shard of the split. `left_out` is always empty: a map-style split stands the next
    readable image in for an unreadable one (`data.ReadableSubset`).

    Args:
        count: the split's length.
    """

    left_out: tuple[str, ...] = ()

    def __init__(self, count: int):
        self.count = count
        self.shards: list[Shard] = []

    def own(self, split: str, shard_size: int, process: int, processes: int) -> Iterator[Shard]:
        self.shards = [Shard(split, index, start, min(start + shard_size, self.count))
                       for index, start in enumerate(range(0, self.count, shard_size))]
        return iter(self.shards[process::processes])


class StreamShards:
    """A stream's train split, cut into shards as it is read (module docstring, "Streams").

    `own(split, shard_size, process, processes)` reads the split's entries in the stream's order,
    undecoded, and stops at each shard of `process` (one with at least one entry), where `items()`
    decodes that shard's entries for encoding; what is left of a shard when `own` goes on is
    skipped undecoded. Once the stream has ended, `shards` is every shard of the split.
    `left_out` names the unreadable images that the last `items()` left out.

    Args:
        images: the train split.
    """

    def __init__(self, images: StreamingImages):
        self.images = images
        self.shards: list[Shard] = []
        self.left_out: list[str] = []
        self._entries: Iterator[dict] = iter(())  # the undecoded entries of the shard `own` stopped at

    def own(self, split: str, shard_size: int, process: int, processes: int) -> Iterator[Shard]:
        entries = self.images.train_entries()
        shards = []
        while (first := next(entries, None)) is not None:
            index = len(shards)
            shards.append(Shard(split, index, index * shard_size, (index + 1) * shard_size, streamed=True))
            rest = itertools.islice(entries, shard_size - 1)
            if index % processes == process:
                self._entries = itertools.chain([first], rest)
                yield shards[-1]
            collections.deque(rest, maxlen=0)  # what `items()` did not read of the shard
        if not shards:  # load_stream saw an item after the validation ones: each repeats one of them
            raise ValueError(f"{self.images.origin}: the stream has no training item: every item after its first "
                             f"{self.images.cfg.stream_validation_samples} (the validation split) repeats one of them")
        self.shards = shards

    def items(self) -> Iterator[dict[str, torch.Tensor]]:
        """The readable items of the shard `own` stopped at, decoded in order."""
        self.left_out = []
        return self.images.items(self._entries, self.left_out)


def build_cache(folder: Path, info: dict[str, str], splits: dict[str, int | StreamShards],
                encode: Callable[[Shard], tuple[torch.Tensor, torch.Tensor]],
                state: Accelerator | PartialState, shard_size: int = SHARD_ITEMS) -> dict:
    """The manifest of the cache in `folder` once it is complete; every process must call this.

    `splits` gives each split's items: a count (a map-style split, `PlannedShards`) or a
    `StreamShards`. Each process checks its shards (round-robin over the splits' shards in turn)
    and writes those missing or damaged, as `encode(shard)` -> (latents (N, C, H, W) float32,
    labels (N,) int64) gives them; then the main process deletes what is no shard of the cache and
    writes the manifest. `info` (with the "key") goes into every header and the manifest.
    """
    sources = {split: PlannedShards(source) if isinstance(source, int) else source for split, source in splits.items()}
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(folder, info["key"], warn=state.is_main_process)
    listed = {entry["file"]: entry for split in (previous or {}).get("splits", {}).values()
              for entry in split["shards"]}
    encoded = before = 0  # shards encoded here; shards of the splits before this one
    for split, source in sources.items():
        # Shard i of this split is number before + i of the cache: the round-robin's turn goes on.
        for shard in source.own(split, shard_size, (state.process_index - before) % state.num_processes,
                                state.num_processes):
            path = folder / shard.name
            for leftover in folder.glob(f".tmp-*-{shard.name}"):  # of an encode killed while writing
                leftover.unlink(missing_ok=True)
            problem = _check_shard(path, shard, info["key"], listed.get(shard.name))
            if problem is None:
                continue
            if path.exists() or shard.name in listed:  # else not encoded yet (a first or killed encode)
                warnings.warn(f"latent cache shard {path} {problem}; encoding it again", stacklevel=2)
            latents, labels = encode(shard)
            _write_shard(path, {"latents": latents.contiguous(), "labels": labels.contiguous()},
                         shard.header(info, len(labels), list(source.left_out)))
            encoded += 1
        before += len(source.shards)
    encoded = int(reduce(torch.tensor(encoded, device=state.device), "sum"))
    state.wait_for_everyone()
    if state.is_main_process:
        shards = [shard for source in sources.values() for shard in source.shards]
        _sweep(folder, shards)
        manifest = _manifest(folder, shards, info, shard_size)
        if manifest != previous:
            _replace_atomically(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        if encoded:
            items = ", ".join(f"{entry['count']} {split}" for split, entry in manifest["splits"].items())
            state.print(f"cached {items} latents in {folder}: encoded {encoded} of {len(shards)} shard(s) "
                        f"with {state.num_processes} process(es)")
    state.wait_for_everyone()
    return json.loads((folder / MANIFEST).read_text())


def _check_left_out(manifest: dict, cfg: DataConfig, folder: Path, warn: bool) -> None:
    """A stream's unreadable images, left out of its cache's train split: an error once more than
    data.max_bad_fraction of its images are (`BadImageTally.check`), else one warning naming them
    (when `warn`). At every run that reads the cache, as a map-style run counts them at every run."""
    train = manifest["splits"]["train"]
    if not train["left_out"]:
        return
    tally = BadImageTally.of(cfg, train["count"] + len(train["left_out"]))
    tally.names = set(train["left_out"])
    tally.check()
    if warn:
        warnings.warn(f"{tally.origin}: left {len(tally.names)} unreadable image(s) of its {tally.total} training "
                      f"images out of the latent cache in {folder}: {tally.named()}", stacklevel=3)


def open_cache(folder: Path) -> dict[str, LatentShards]:
    """The splits of the complete cache in `folder` as its manifest lists them, without checking
    the shards (`cached_latents` and `build_cache` check them)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return {split: LatentShards(folder, manifest, split) for split in manifest["splits"]}


class LatentShards(Dataset):
    """One split of a sharded latent cache, read from its files item by item: nothing of it stays
    in memory, so a process's memory does not grow with the split (module docstring, "Reading").

    Items are {"x": float32 (C, H, W), "label": int64 scalar}, as an InMemoryDataset's.
    `__getitems__`, which DataLoader calls once per batch, fills the batch with one positioned read
    per item. An item's shard is found by bisecting the shards' first indices, not by dividing by
    the shard size: a stream's shards may hold fewer items (module docstring, "Streams"). Among 257
    shards a bisect takes 0.19 us, a division 0.09, beside 4.6 us to read an item (shuffled 4x8x8
    latents, this project's CPU). Files are opened on first use in each process (a DataLoader
    worker opens its own), at most OPEN_SHARDS at a time.

    Args:
        folder: the cache folder.
        manifest: its manifest (what `build_cache` returns).
        split: "train" or "validation".
    """

    def __init__(self, folder: Path, manifest: dict, split: str):
        entry = manifest["splits"][split]
        self.files = [folder / shard["file"] for shard in entry["shards"]]
        self.offsets = [(shard["latents_offset"], shard["labels_offset"]) for shard in entry["shards"]]
        # The index of each shard's first item, then the split's count.
        self.starts = list(itertools.accumulate((shard["count"] for shard in entry["shards"]), initial=0))
        self.shape = tuple(entry["shape"])  # (C, H, W)
        self.count = entry["count"]
        self.item_bytes = 4 * math.prod(self.shape)  # float32
        self._files, self._fds, self._pid = collections.OrderedDict(), {}, None  # this process's open shard files

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        count, item_bytes = len(indices), self.item_bytes
        x = torch.empty((count, *self.shape), dtype=torch.float32)
        labels = torch.empty(count, dtype=torch.int64)
        x_bytes = memoryview(x.view(-1).view(torch.uint8).numpy())  # x's memory, written in place
        label_bytes = memoryview(labels.view(torch.uint8).numpy())
        files = self._open_files()
        for row, index in enumerate(indices):
            index = self._checked(index)
            shard = bisect.bisect_right(self.starts, index) - 1  # the last shard starting at or before it
            position = index - self.starts[shard]
            fd = files.get(shard)
            if fd is None:
                fd = self._open(shard)
            latents_at, labels_at = self.offsets[shard]
            # Regular files return all bytes asked for, except past their end.
            if (os.preadv(fd, [x_bytes[row * item_bytes:(row + 1) * item_bytes]],
                          latents_at + position * item_bytes) != item_bytes
                    or os.preadv(fd, [label_bytes[row * 8:(row + 1) * 8]], labels_at + position * 8) != 8):
                raise OSError(f"latent cache shard {self.files[shard]} ends early: it changed after the cache "
                              "was checked")
        return [{"x": x[row], "label": labels[row]} for row in range(count)]

    @property
    def samples(self) -> torch.Tensor:
        """The whole split as one (N, C, H, W) tensor, read into memory: for the few uses that
        need every item at once (on data small enough to hold)."""
        return self._read_all("latents", (self.count, *self.shape), torch.float32)

    @property
    def labels(self) -> torch.Tensor:
        """The (N,) labels of the split, read into memory."""
        return self._read_all("labels", (self.count,), torch.int64)

    def _read_all(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        rows = out.view(self.count, -1).view(torch.uint8).numpy()
        for shard, (path, offsets) in enumerate(zip(self.files, self.offsets)):
            with open(path, "rb", buffering=0) as f:
                _read_into(f.fileno(), rows[self.starts[shard]:self.starts[shard + 1]], offsets[name == "labels"],
                           path)
        return out

    def _checked(self, index: int) -> int:
        index = int(index)
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} is out of range for a split of {self.count} latents")
        return index % self.count

    def _open_files(self) -> dict[int, int]:
        """{shard: file descriptor} of the shard files this process has open."""
        if self._pid != os.getpid():  # first use in this process (e.g. a forked DataLoader worker)
            self.close()
            self._pid = os.getpid()
        return self._fds

    def _open(self, shard: int) -> int:
        if len(self._files) >= OPEN_SHARDS:  # close the one opened first
            oldest, file = self._files.popitem(last=False)
            del self._fds[oldest]
            file.close()
        file = self._files[shard] = open(self.files[shard], "rb", buffering=0)
        self._fds[shard] = file.fileno()
        return self._fds[shard]

    def close(self) -> None:
        """Close the open shard files (reading again reopens them). In a forked process, the files
        it inherited: their descriptors are its own copies, closing them leaves the parent's open."""
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:  # open files stay in their process
        return {**self.__dict__, "_files": collections.OrderedDict(), "_fds": {}, "_pid": None}


def _read_into(fd: int, buffer: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(buffer.reshape(-1))  # uint8, flat (a cast would refuse a stream's empty shard)
    while view:
        read = os.preadv(fd, [view], offset)
        if not read:
            raise OSError(f"latent cache shard {path} ends early: it changed after the cache was checked")
        view, offset = view[read:], offset + read


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named CPU tensors (names and bytes): the checksum a shard carries in its header."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    # One metadata entry, its JSON with sorted keys: safetensors writes several in hash order,
    # which differs between processes, and shards must not depend on who wrote them.
    metadata = {SHARD_HEADER_KEY: json.dumps({**header, "sha256": tensors_digest(tensors)}, sort_keys=True)}
    _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)`, then rename tmp to `path`: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: free what the partial file took
        raise


def _sweep(folder: Path, shards: list[Shard]) -> None:
    """Delete what is no shard of the cache (shards of another shard size, or past a stream's end),
    and what kills left under a temporary name: called once every process is done encoding."""
    names = {shard.name for shard in shards} | {MANIFEST}
    for path in folder.iterdir():
        if path.is_file() and path.name not in names:
            path.unlink(missing_ok=True)


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` and where its data starts; a ValueError saying what is wrong
    ("is truncated or overwritten: ...") if the file is not a whole safetensors file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"is unreadable: {size} bytes, no safetensors header")
        try:
            header = json.loads(f.read(length))
            end = max((tensor["data_offsets"][1] for name, tensor in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"is unreadable: a malformed safetensors header ({type(err).__name__}: {err})") from err
    if size != 8 + length + end:
        raise ValueError(f"is truncated or overwritten: {size} bytes, its header describes {8 + length + end}")
    return header, 8 + length


def _check_shard(path: Path, shard: Shard, key: str, listed: dict | None) -> str | None:
    """What is wrong with the shard file at `path` (None: it is whole and holds `shard` of `key`)."""
    if not path.exists():
        return "is missing"
    try:
        header, data_start = _read_header(path)
    except OSError as err:
        return f"is unreadable ({err})"
    except ValueError as err:
        return str(err)
    try:
        own = json.loads(header["__metadata__"][SHARD_HEADER_KEY])
        tensors = {name: (header[name]["dtype"], header[name]["shape"][:1]) for name in ("latents", "labels")}
    except (KeyError, TypeError, ValueError):
        return f"is not a latent cache shard (no {SHARD_HEADER_KEY!r} entry, or no latents and labels)"
    if own.get("key") != key:
        return "was made from another VAE, data or latent mode"
    count, left_out, positions = own.get("count"), own.get("left_out"), shard.stop - shard.start
    # Every position holds an item or is left out; a stream's last shard covers positions past its end.
    covered = count + len(left_out) if isinstance(count, int) and isinstance(left_out, list) else -1
    if ((own.get("split"), own.get("start"), own.get("stop")) != (shard.split, shard.start, shard.stop)
            or not (0 <= count <= covered <= positions if shard.streamed else count == covered == positions)
            or tensors != {"latents": ("F32", [count]), "labels": ("I64", [count])}):
        return f"does not hold {shard.split} items {shard.start}..{shard.stop - 1}"
    if listed is not None and (listed["sha256"], listed["count"]) != (own["sha256"], count):
        return f"is not the one {MANIFEST} lists (another SHA-256 or count)"
    if _file_digest(path, header, data_start) != own["sha256"]:
        return "is corrupted (its tensors do not match the SHA-256 in its header)"
    return None


def _file_digest(path: Path, header: dict, data_start: int) -> str:
    """`tensors_digest` of a safetensors file's tensors, streamed from the file in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for name in sorted(name for name in header if name != "__metadata__"):
            begin, end = header[name]["data_offsets"]
            digest.update(name.encode())
            f.seek(data_start + begin)
            remaining = end - begin
            while remaining and (chunk := f.read(min(1 << 20, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


def _manifest(folder: Path, shards: list[Shard], info: dict[str, str], shard_size: int) -> dict:
    """The manifest of complete shards: what a reader needs (counts, shapes, where tensors start),
    each shard's size and SHA-256, and each split's unreadable images left out."""
    splits = {}
    for shard in shards:
        path = folder / shard.name
        header, data_start = _read_header(path)
        own = json.loads(header["__metadata__"][SHARD_HEADER_KEY])
        split = splits.setdefault(shard.split, {"count": 0, "shape": header["latents"]["shape"][1:], "left_out": [],
                                                "shards": []})
        split["count"] += own["count"]
        split["left_out"] += own["left_out"]
        split["shards"].append({
            "file": shard.name, "start": shard.start, "stop": shard.stop, "count": own["count"],
            "bytes": path.stat().st_size, "sha256": own["sha256"],
            "latents_offset": data_start + header["latents"]["data_offsets"][0],
            "labels_offset": data_start + header["labels"]["data_offsets"][0]})
    return {"layout": CACHE_LAYOUT, **info, "shard_size": shard_size, "splits": splits}


def _read_manifest(folder: Path, key: str, warn: bool) -> dict | None:
    """The manifest in `folder` if there is a readable one of `key` (else None, with a warning
    naming it when `warn` and there is one)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("key") == key and manifest.get("layout") == CACHE_LAYOUT:
            return manifest
        problem = "was made from another VAE, data or latent mode"
    except (OSError, ValueError, AttributeError) as err:
        problem = f"is unreadable ({type(err).__name__}: {err})"
    if warn:
        warnings.warn(f"latent cache manifest {path} {problem}; checking every shard and writing it again",
                      stacklevel=3)
    return None


@torch.no_grad()
def _encode(vae: AutoencoderKL, items: Iterable[dict], mode: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, H, W), labels (N,)) of `items`, encoded in batches of `batch_size` from the first."""
    channels, height, width = latent_shape(vae.config)
    latents = [torch.empty(0, channels * (2 if mode == "sample" else 1), height, width)]  # a stream's shard
    labels = [torch.empty(0, dtype=torch.int64)]  # may have no readable image
    items = iter(items)
    while batch := list(itertools.islice(items, batch_size)):
        batch = default_collate(batch)
        posterior = vae.encode(batch["x"].to(vae.device)).latent_dist
        z = posterior.mean if mode == "mean" else torch.cat([posterior.mean, posterior.std], 1)
        latents.append((z * vae.config.scaling_factor).cpu())
        labels.append(batch["label"])
    return torch.cat(latents).contiguous(), torch.cat(labels)


def check_vae_input(stage_name: str, data: DataSplits, input_dir: Path) -> Path:
    """The VAE folder of an `input:` stage, checked against the data it will encode."""
    vae_dir = input_dir / "vae"
    if not (vae_dir / "config.json").is_file():
        raise ValueError(f"stages.{stage_name}.input: {input_dir} holds no trained VAE (no vae/config.json)")
    vae = AutoencoderKL.load_config(vae_dir)
    if vae.get("_class_name") != AutoencoderKL.__name__:
        raise ValueError(f"stages.{stage_name}.input: {vae_dir / 'config.json'} describes a {vae.get('_class_name')}, "
                         f"not a VAE ({AutoencoderKL.__name__}); input: must name a vae stage")
    if not (vae_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise ValueError(f"stages.{stage_name}.input: {vae_dir} has no {SAFETENSORS_WEIGHTS_NAME}: "
                         "its VAE stage did not finish, or the folder lost files")
    channels, resolution, _ = data.sample_shape
    if vae["in_channels"] != channels or vae["sample_size"] != resolution:
        raise ValueError(
            f"stages.{stage_name}.input: the VAE in {vae_dir} was trained on {vae['in_channels']}x"
            f"{vae['sample_size']}x{vae['sample_size']} images, the data is {channels}x{resolution}x{resolution}")
    return vae_dir


def sample_posterior(x: torch.Tensor) -> torch.Tensor:
    """z = mean + std * eps from a latent batch cached with mode "sample" ([mean, std] on channels)."""
    mean, std = x.chunk(2, dim=1)
    return mean + std * torch.randn_like(mean)


@torch.no_grad()
def decode_latents(vae_dir: Path, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents z (the VAE's scaling_factor undone)."""
    vae = load_vae(vae_dir, z.device)
    if z.shape[1] != vae.config.latent_channels:
        raise ValueError(f"{vae_dir}: this VAE decodes {vae.config.latent_channels}-channel latents, the samples "
                         f"have {z.shape[1]} channels: the model and this VAE come from different runs")
    return torch.cat([vae.decode(chunk / vae.config.scaling_factor).sample
                      for chunk in z.split(batch_size)]).clamp(-1, 1)
