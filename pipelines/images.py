"""Image grids, PNG files and point-cloud pictures of tensors (images in [-1, 1])."""

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(images, "b c h w -> b h w c").numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (rows*H, nrow*W, C) uint8 array."""
    batch = images.shape[0]
    nrow = nrow or math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / nrow)
    fill = torch.full((rows * nrow - batch, *images.shape[1:]), -1.0, dtype=images.dtype, device=images.device)
    tiles = torch.nn.functional.pad(torch.cat([images, fill]), (padding,) * 4, value=-1.0)
    grid = rearrange(tiles, "(r n) c h w -> c (r h) (n w)", n=nrow)
    return to_uint8(grid[None])[0]


def class_rows(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, C, H, W) images of (B,) class labels -> (tiles, nrow) for `make_grid`: one row per
    class present, in class order, short rows padded with blank (-1) tiles."""
    classes = labels.unique()  # sorted
    nrow = int(max((labels == c).sum() for c in classes))
    rows = [images[labels == c] for c in classes]
    blank = images.new_full((1, *images.shape[1:]), -1.0)
    return torch.cat([torch.cat([row, blank.expand(nrow - len(row), *images.shape[1:])]) for row in rows]), nrow


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Save an (H, W, C) uint8 array with C in {1, 3, 4} as a PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_png(make_grid(images, nrow), path)


def scatter_image(points: torch.Tensor, size: int = 256, extent: float | None = None) -> torch.Tensor:
    """A (1, 1, size, size) image in [-1, 1] of a 2D point cloud (log-scaled counts), for previews."""
    points = points.detach().float().cpu().numpy()
    extent = extent or float(np.abs(points).max()) * 1.1 + 1e-6
    counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[[-extent, extent]] * 2)
    image = np.log1p(counts[::-1].copy())
    image = image / max(image.max(), 1e-6)
    return torch.from_numpy(1 - 2 * image).float()[None, None]
