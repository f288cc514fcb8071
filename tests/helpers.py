"""What the tests share besides fixtures (conftest.py): tiny run configs and data. Imported as
`from helpers import ...` (pytest puts tests/ on the path); tests/reliability has its own
`reliability.helpers`."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_vae_config(output_dir, **training) -> dict:
    """A raw run config for a VAE small enough to train a few steps in seconds, scored on 128 of the
    500 held-out digits (all 500: 11.8 s a run, of which 7.6 s the patch metric's sorts)."""
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "log_with": "none",
        "data": {"source": "mnist", "resolution": 16, "max_train_samples": 256, "max_eval_samples": 128},
        "stages": [{
            "name": "vae",
            "kind": "vae",
            "model": {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8},
            "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 1e-3, "log_every": 2, **training},
        }],
    }


def noise_image_folder(folder: Path, count: int) -> dict:
    """The `data:` block of `count` 16x16 grayscale images written to `folder`: noise, smoothed a little."""
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR).save(folder / f"{i:02d}.png")
    return {"source": "imagefolder", "train_data_dir": str(folder), "resolution": 16, "validation_fraction": 0.25}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def class_image_folder(root: Path, images_by_class: dict[str, list[np.ndarray]]) -> dict:
    """The `data:` block of an 8x8 grayscale image folder whose subfolders are the classes (in
    sorted order: class 0 first), with a quarter of each held out."""
    for name, images in images_by_class.items():
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return {"source": "imagefolder", "train_data_dir": str(root), "resolution": 8, "validation_fraction": 0.25}


def dark_and_light(images_per_class: int) -> dict[str, list[np.ndarray]]:
    """Two classes of 8x8 images a sample's mean tells apart: all black ("dark", class 0), all white."""
    return {name: [np.full((8, 8), value, np.uint8)] * images_per_class for name, value in (("dark", 0), ("light", 255))}
