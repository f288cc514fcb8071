"""The stage-1 VAE as later stages use it: loading it, decoding its prior and latents, and
latent caching for stage 2 (encode the dataset once with the frozen VAE, train from disk).

The cache is one safetensors file keyed by a hash of what made it: the VAE's weights and config,
the data config (for an image folder, also its files' names, sizes and times), the latent mode and
the cache layout. It is written to a temporary name and renamed into place, and its header carries
that key and the SHA-256 of its tensors (the completeness marker): a killed encode leaves no file
that a later run could mistake for a complete cache, a truncated or corrupted cache is named in a
warning and encoded again, and a retrained VAE or changed data never reuses stale latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .checkpoint import hash_file
from .data import DataSplits, InMemoryDataset

CACHE_LAYOUT = "1"  # bump when what a cache holds changes


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
                   batch_size: int = 256) -> DataSplits:
    """Latent splits of `data`: z * scaling_factor (mode "mean"), or [mean, std] * scaling_factor
    stacked on the channel axis (mode "sample": the training step draws z = mean + std * eps)."""
    key = cache_key(vae_dir, data, mode)
    path = cache_dir / f"latents-{key[:16]}.safetensors"
    tensors = _read_cache(path, key) if accelerator.is_main_process else None
    if accelerator.is_main_process and tensors is None:
        vae = load_vae(vae_dir, accelerator.device)
        tensors = {}
        for split in ("train", "validation"):
            tensors[split], tensors[f"{split}_labels"] = _encode(vae, getattr(data, split), mode, batch_size)
        _write_cache(tensors, path, {"key": key, "vae_dir": str(vae_dir), "mode": mode, "data": data.description})
        accelerator.print(f"cached {len(tensors['train'])} + {len(tensors['validation'])} latents in {path}")
    accelerator.wait_for_everyone()
    if tensors is None:  # the other processes read what the main process checked or wrote
        tensors = load_file(path)
    channels = tensors["train"].shape[1] // (2 if mode == "sample" else 1)
    return DataSplits(
        train=InMemoryDataset(tensors["train"], tensors["train_labels"]),
        validation=InMemoryDataset(tensors["validation"], tensors["validation_labels"]),
        sample_shape=(channels, *tensors["train"].shape[2:]),
        kind="latent",
        num_classes=data.num_classes,
        description=f"latents {channels}x{tensors['train'].shape[2]}x{tensors['train'].shape[3]} of {data.description}",
        config=data.config,
    )


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named CPU tensors (names and bytes): the checksum a cache carries in its header."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def _write_cache(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(".tmp-*"):  # of encodes killed while writing
        leftover.unlink()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save_file(tensors, tmp, metadata={**metadata, "sha256": tensors_digest(tensors)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: free what the partial file took
        raise


def _read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of the cache at `path` if it is complete and was made from `key`, else None
    (with a warning naming the file when there is one)."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as err:
        problem = f"is unreadable ({err})"
    else:
        if metadata.get("key") != key:
            problem = "was made from another VAE, data or latent mode"
        elif metadata.get("sha256") != tensors_digest(tensors):
            problem = "is truncated or corrupted (its tensors do not match the SHA-256 in its header)"
        else:
            return tensors
    warnings.warn(f"latent cache {path} {problem}; encoding the latents again", stacklevel=3)
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
