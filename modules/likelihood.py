"""Likelihoods of 8-bit images in nats and bits per dimension.

Convention (shared by every family that reports a likelihood): an 8-bit value k in {0..255}
is stored as y = k / 127.5 - 1 in [-1, 1]; uniform dequantization gives the continuous value
(k + u) / 127.5 - 1 with u ~ U[0, 1). A density on y maps to a density on the dequantized data
in [0, 256) through the Jacobian of y = x / 127.5 - 1, so

    bits/dim = (nats on y + D ln 127.5) / (D ln 2),

i.e. nats per dimension of the dequantized [0, 256) data divided by ln 2. A uniform density on
[0, 256)^D scores exactly 8 bits/dim.
"""

import math

import torch

PIXEL_SCALE = 127.5  # y = k / PIXEL_SCALE - 1


def dequantize(y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add U[0, 1) noise in 8-bit units to images stored as k / 127.5 - 1."""
    noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return y + noise / PIXEL_SCALE


def bits_per_dim(nats: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Negative log-likelihood `nats` of one datum in [-1, 1] space, as bits/dim of [0, 256) data."""
    return (nats + num_dims * math.log(PIXEL_SCALE)) / (num_dims * math.log(2))
