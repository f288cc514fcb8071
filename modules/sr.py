"""Super-resolution (seed parts I and V): the degradation that makes low-resolution inputs, and
the supervised regressor that the generative model is compared with.

The seed's conditional model p(X | Y): X a high-resolution image, Y its low-resolution version.
A regressor trained with L2 predicts E[X | Y], an average of every plausible X, hence blurry;
a conditional DDPM (modules/ddpm.EpsilonPredictionLoss with a condition) samples one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ddpm import split_condition


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W) images, antialiased when shrinking (as PIL's BICUBIC)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bicubic", antialias=shrinking, align_corners=False)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius 3 sigma, reflect padding); identity for sigma 0."""
    if sigma <= 0:
        return images
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def downsample(high_res: torch.Tensor, scale: int, blur_sigma: float = 0.0) -> torch.Tensor:
    """Y = bicubic_down(blur(X), scale): the low-resolution input made from a (B, C, H, W) image in [-1, 1]."""
    height, width = high_res.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by the scale factor {scale}")
    return resize(gaussian_blur(high_res, blur_sigma), (height // scale, width // scale)).clamp(-1, 1)


def add_noise(low_res: torch.Tensor, noise_std: float) -> torch.Tensor:
    """Y + N(0, noise_std^2) per pixel (in [-1, 1] units), drawn from the global RNG: a random
    degradation at training time teaches the model not to trust the input's finest detail."""
    if noise_std <= 0:
        return low_res
    return (low_res + noise_std * torch.randn_like(low_res)).clamp(-1, 1)


class RegressionLoss(nn.Module):
    """The seed's supervised regressor: min_theta E || x - g_theta(y) ||^2, averaged over dimensions.

    Its optimum is E[X | Y], the mean of the plausible high-resolution images: the blurry baseline
    a generative super-resolution model is measured against.

    Args:
        network: g_theta, a diffusers `UNet2DModel` (called with timestep 0, which it ignores in effect).
        condition_channels: the last `condition_channels` channels of the batch are y, the others x
            (x may be a residual, x - bicubic_up(y): pipelines/stages/sr.py's `residual`).
    """

    def __init__(self, network: nn.Module, condition_channels: int):
        super().__init__()
        self.network = network
        self.condition_channels = condition_channels

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.per_example_loss(batch).mean()}

    def per_example_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,) squared errors ||x - g(y)||^2, each averaged over its example's pixels."""
        x, y = split_condition(batch, self.condition_channels)
        return (self.network(y, 0).sample.float() - x.float()).pow(2).flatten(1).mean(1)
