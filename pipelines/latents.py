"""The stage-1 VAE as later stages use it: loading it, decoding its prior and latents, and
latent caching for stage 2 (encode the dataset once with the frozen VAE, train from disk).

A latent cache is a folder named by a hash of what made it (`cache_key`: the VAE's weights and
config, the data config, for an image folder also its files' names, sizes and times, the latent
mode and the cache layout), holding fixed-size shards and a manifest:

    cache/latents-<key16>/train-00000.safetensors, train-00001..., validation-00000..., manifest.json

- **Shards.** A split is cut into shards of SHARD_ITEMS consecutive items (the last one shorter),
  whatever the number of processes. A shard holds `latents` (N, C, H, W) float32, z *
  scaling_factor (`latents: sample`: [mean, std] * scaling_factor on the channel axis), and
  `labels` (N,) int64; its header names the cache key, the split, its first item and count, and
  the SHA-256 of its tensors.
- **Encoding, by every process.** Process r of P encodes shards r, r + P, ...: each shard alone,
  in batches that start at its first item, with the VAE in eval mode and nothing random. Shard
  bounds and batches depend on the data alone, so 1 and P processes write the same files byte for
  byte. Each shard is written under a temporary name and renamed into place. When every process
  is done, the main process writes manifest.json, last and the same way: every shard with its
  count, size, SHA-256 and where its tensors start in the file.
- **Checking, at every run.** Each process checks its own shards in full: the header against the
  key and the manifest, and the SHA-256 of the tensor bytes, streamed (1.7 GB/s on this project's
  CPU: 0.6 s for a million 4x8x8 latents, 1 GiB, split between the processes). That is the price
  of never training on a flipped bit, small beside training on a million latents; checking only
  sizes and headers would miss a flipped bit. A missing, truncated, corrupted or stale shard is
  named in a warning and encoded again; the others are kept, so a killed encode resumes from its
  finished shards, and what a kill leaves under a temporary name is deleted, never read. A
  retrained VAE or changed data has another key: stale latents are never reused.
- **Reading.** `LatentShards` reads items from the shard files with positioned reads
  (`os.preadv`, one per item, a batch at a time through `__getitems__`), not from a memory map:
  the pages of a map that reading touches count to the process's resident memory, while the page
  cache that pread goes through is the kernel's. One shuffled epoch over 100,000 4x8x8 latents
  (98 MiB) grew the resident set by 16 MiB through `np.memmap`, 21 MiB through safetensors'
  `safe_open(...).get_slice`, nothing through pread (read in order, a map grows by all 98). Nothing
  of a split is held in memory, so a training process's memory does not grow with the number of
  cached latents (`stagediff benchmark --data-only` measures it: benchmarks/data.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import resource
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce
from diffusers import AutoencoderKL
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import hash_file
from .data import DataSplits

CACHE_LAYOUT = "2"  # bump when what a cache holds changes (2: shards and a manifest)
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
    cfg = autoencoder.config
    size = cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1)
    shape = (num_samples, cfg.latent_channels, size, size)
    z = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
    return autoencoder.decode(z).sample.clamp(-1, 1)


def cache_key(vae_dir: Path, data: DataSplits, mode: str) -> str:
    """SHA-256 of everything the cached latents depend on."""
    digest = hashlib.sha256(f"{CACHE_LAYOUT}|{mode}|{data.description}|".encode())
    digest.update(json.dumps(dataclasses.asdict(data.config), sort_keys=True).encode())
    if data.config.source == "imagefolder":
        root = Path(data.config.train_data_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"|{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for name in ("config.json", SAFETENSORS_WEIGHTS_NAME):
        hash_file(vae_dir / name, digest)
    return digest.hexdigest()


def cached_latents(vae_dir: Path, data: DataSplits, mode: str, cache_dir: Path, accelerator: Accelerator,
                   batch_size: int = 256, shard_size: int = SHARD_ITEMS) -> DataSplits:
    """Latent splits of `data`: z * scaling_factor (mode "mean"), or [mean, std] * scaling_factor
    stacked on the channel axis (mode "sample": the training step draws z = mean + std * eps),
    read from the sharded cache in `cache_dir`, which every process helps to encode and check."""
    key = cache_key(vae_dir, data, mode)
    folder = cache_dir / f"latents-{key[:16]}"
    vae = functools.cache(lambda: load_vae(vae_dir, accelerator.device))  # only where a shard needs encoding

    def encode(shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        return _encode(vae(), Subset(getattr(data, shard.split), range(shard.start, shard.stop)), mode, batch_size)

    info = {"key": key, "vae_dir": str(vae_dir), "mode": mode, "data": data.description}
    manifest = build_cache(folder, info, {split: len(getattr(data, split)) for split in SPLITS}, encode,
                           accelerator, shard_size)
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
    """Items start..stop-1 of a split: shard `index` of SHARD_ITEMS (or the cache's shard size)."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.safetensors"

    def header(self, info: dict[str, str]) -> dict:
        return {**info, "split": self.split, "start": self.start, "count": self.stop - self.start}


def plan_shards(counts: dict[str, int], shard_size: int = SHARD_ITEMS) -> list[Shard]:
    """Every split's shards, in order: bounds that depend on the item counts alone."""
    return [Shard(split, index, start, min(start + shard_size, count))
            for split, count in counts.items() for index, start in enumerate(range(0, count, shard_size))]


def build_cache(folder: Path, info: dict[str, str], counts: dict[str, int],
                encode: Callable[[Shard], tuple[torch.Tensor, torch.Tensor]],
                state: Accelerator | PartialState, shard_size: int = SHARD_ITEMS) -> dict:
    """The manifest of the cache in `folder` once it is complete; every process must call this.

    Each process checks its shards (round-robin) and writes those missing or damaged, as
    `encode(shard)` -> (latents (N, C, H, W) float32, labels (N,) int64) gives them; then the
    main process writes the manifest. `info` (with the "key") goes into every header and the manifest.
    """
    shards = plan_shards(counts, shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(folder, info["key"], warn=state.is_main_process)
    listed = {entry["file"]: entry for split in (previous or {}).get("splits", {}).values()
              for entry in split["shards"]}
    if state.is_main_process:
        _sweep(folder, shards)
    encoded = 0
    for shard in shards[state.process_index::state.num_processes]:
        path = folder / shard.name
        for leftover in folder.glob(f".tmp-*-{shard.name}"):  # of an encode killed while writing
            leftover.unlink(missing_ok=True)
        problem = _check_shard(path, shard, info["key"], listed.get(shard.name))
        if problem is None:
            continue
        if path.exists() or shard.name in listed:  # else not encoded yet (a first or killed encode)
            warnings.warn(f"latent cache shard {path} {problem}; encoding it again", stacklevel=2)
        latents, labels = encode(shard)
        _write_shard(path, {"latents": latents.contiguous(), "labels": labels.contiguous()}, shard.header(info))
        encoded += 1
    encoded = int(reduce(torch.tensor(encoded, device=state.device), "sum"))
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = _manifest(folder, shards, info, shard_size)
        if manifest != previous:
            _replace_atomically(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        if encoded:
            items = ", ".join(f"{count} {split}" for split, count in counts.items())
            state.print(f"cached {items} latents in {folder}: encoded {encoded} of {len(shards)} shard(s) "
                        f"with {state.num_processes} process(es)")
    state.wait_for_everyone()
    return json.loads((folder / MANIFEST).read_text())


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
    per item. Files are opened on first use in each process (a DataLoader worker opens its own),
    at most OPEN_SHARDS at a time.

    Args:
        folder: the cache folder.
        manifest: its manifest (what `build_cache` returns).
        split: "train" or "validation".
    """

    def __init__(self, folder: Path, manifest: dict, split: str):
        entry = manifest["splits"][split]
        self.files = [folder / shard["file"] for shard in entry["shards"]]
        self.offsets = [(shard["latents_offset"], shard["labels_offset"]) for shard in entry["shards"]]
        self.shape = tuple(entry["shape"])  # (C, H, W)
        self.shard_size = manifest["shard_size"]
        self.count = entry["count"]
        self.item_bytes = 4 * math.prod(self.shape)  # float32
        self._files, self._fds, self._pid = OrderedDict(), {}, None  # this process's open shard files

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
            shard, position = divmod(self._checked(index), self.shard_size)
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
            start = shard * self.shard_size
            with open(path, "rb", buffering=0) as f:
                _read_into(f.fileno(), rows[start:start + self.shard_size], offsets[name == "labels"], path)
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
        return {**self.__dict__, "_files": OrderedDict(), "_fds": {}, "_pid": None}


def _read_into(fd: int, buffer: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(buffer).cast("B")
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
    """Delete what is no shard of this plan (shards of another shard size) and the main
    process's own leftovers; other processes' temporary shards are their owners' to sweep."""
    names = {shard.name for shard in shards}
    for path in folder.iterdir():
        owned = path.name.startswith(".tmp-") and path.name.split("-", 2)[-1] in names
        if path.is_file() and path.name not in names | {MANIFEST} and not owned:
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
    count = shard.stop - shard.start
    if (own.get("split"), own.get("start"), own.get("count")) != (shard.split, shard.start, count) or tensors != {
            "latents": ("F32", [count]), "labels": ("I64", [count])}:
        return f"does not hold {shard.split} items {shard.start}..{shard.stop - 1}"
    if listed is not None and listed["sha256"] != own["sha256"]:
        return f"is not the one {MANIFEST} lists (another SHA-256)"
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
    """The manifest of complete shards: what a reader needs (counts, shapes, where tensors start) and
    each shard's size and SHA-256."""
    splits = {}
    for shard in shards:
        path = folder / shard.name
        header, data_start = _read_header(path)
        split = splits.setdefault(shard.split, {"count": 0, "shape": header["latents"]["shape"][1:], "shards": []})
        split["count"] += shard.stop - shard.start
        split["shards"].append({
            "file": shard.name, "start": shard.start, "count": shard.stop - shard.start,
            "bytes": path.stat().st_size,
            "sha256": json.loads(header["__metadata__"][SHARD_HEADER_KEY])["sha256"],
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
def _encode(vae: AutoencoderKL, dataset, mode: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    latents, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
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
