"""Latent caching for stage 2: encode the dataset once with the frozen VAE, train from disk.

The cache is one safetensors file named by a hash of the VAE's weights and config, the data
description and the latent mode, written to a temporary name and renamed into place: a killed
encode leaves no file that a later run could mistake for a complete cache, and a retrained VAE
never reuses stale latents.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .data import DataSplits, InMemoryDataset


def vae_fingerprint(vae_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        with open(vae_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cached_latents(vae_dir: Path, data: DataSplits, mode: str, cache_dir: Path, accelerator: Accelerator,
                   batch_size: int = 256) -> DataSplits:
    """Latent splits of `data`: z * scaling_factor (mode "mean"), or [mean, std] * scaling_factor
    stacked on the channel axis (mode "sample": the training step draws z = mean + std * eps)."""
    key = hashlib.sha256(f"{vae_fingerprint(vae_dir)}|{data.description}|{mode}".encode()).hexdigest()[:16]
    path = cache_dir / f"latents-{key}.safetensors"
    if accelerator.is_main_process and not path.is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir).to(accelerator.device).eval()
        tensors = {}
        for split in ("train", "validation"):
            tensors[split], tensors[f"{split}_labels"] = _encode(vae, getattr(data, split), mode, batch_size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file(tensors, tmp, metadata={"vae_dir": str(vae_dir), "mode": mode, "data": data.description})
        os.replace(tmp, path)
        accelerator.print(f"cached {len(tensors['train'])} + {len(tensors['validation'])} latents in {path}")
    accelerator.wait_for_everyone()
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
    vae = AutoencoderKL.from_pretrained(vae_dir).to(z.device).eval()
    return torch.cat([vae.decode(chunk / vae.config.scaling_factor).sample
                      for chunk in z.split(batch_size)]).clamp(-1, 1)
