"""2D toy distributions with known densities, for exact metrics on low-dimensional models.

Every distribution samples from a caller-given torch.Generator only (so a seed fixes the
samples) and has a normalised log-density:

- Gaussian mixtures (`ring8`, `grid25`): exact; they also expose `modes` (M, 2) and `std` for the
  VEEGAN/PacGAN mode-coverage metric (a sample is high quality within 3 std of its nearest mode).
- `checkerboard`: exact, piecewise constant, -inf off the board's black cells.
- Noisy curves (`moons`, `swissroll`): a curve point at a uniform parameter plus isotropic Gaussian
  noise. Their density, the noise kernel averaged along the curve, is an integral over the
  parameter taken by a midpoint rule: a mixture of `n_quadrature` Gaussians, normalised exactly,
  whose nodes are spaced much closer than `std` so it matches the continuous density closely.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

# Gaussians padded by this many std hold all but ~1e-9 of their mass inside `bounds`.
_BOUNDS_PAD_IN_STD = 6.0
# Elements of the (points, centres) distance matrix built at once by log-density evaluations.
_MAX_PAIRS_PER_CHUNK = 1 << 20


class Toy2D(ABC):
    """A distribution on R^2 that can be sampled and whose log-density is known."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, 2) samples, on the generator's device, drawn with `generator` only."""

    @abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """(n, 2) -> (n,) log-density, in x's dtype and on x's device."""

    @property
    @abstractmethod
    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, x_max, y_min, y_max): a box holding all but a negligible (< 1e-6) mass."""


class IsotropicGaussianMixture(Toy2D):
    """Equal-weight mixture of N(mode, std^2 I) over the rows of `modes`."""

    def __init__(self, modes: Tensor, std: float):
        self.modes = modes  # (M, 2)
        self.std = std

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        device = generator.device
        component = torch.randint(len(self.modes), (n,), generator=generator, device=device)  # (n,)
        noise = torch.randn(n, 2, generator=generator, device=device)  # (n, 2)
        return self.modes.to(device)[component] + self.std * noise

    def log_prob(self, x: Tensor) -> Tensor:
        return _log_mean_isotropic_gaussian(x, self.modes.to(x), self.std)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return _padded_box(self.modes.double(), _BOUNDS_PAD_IN_STD * self.std)


class Ring8(IsotropicGaussianMixture):
    """8 Gaussians evenly spaced on a circle, mode i at angle 2 pi i / 8 (PacGAN's 2D-ring)."""

    def __init__(self, radius: float = 1.0, std: float = 0.01):
        angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8  # (8,)
        modes = radius * torch.stack([angles.cos(), angles.sin()], dim=-1)  # (8, 2)
        super().__init__(modes.float(), std)


class Grid25(IsotropicGaussianMixture):
    """25 Gaussians on the 5x5 grid spacing * {-2, ..., 2}^2 (PacGAN's 2D-grid: {-4, -2, 0, 2, 4}^2)."""

    def __init__(self, spacing: float = 2.0, std: float = 0.05):
        coords = spacing * torch.arange(-2, 3, dtype=torch.float32)  # (5,)
        modes = torch.cartesian_prod(coords, coords)  # (25, 2)
        super().__init__(modes, std)


class Checkerboard(Toy2D):
    """Uniform over the 8 black cells of a 4x4 board of side-2 cells covering [-4, 4)^2.

    Cell (i, j), the square [-4 + 2i, -2 + 2i) x [-4 + 2j, -2 + 2j), is black when i + j is even:
    the same set as FFJORD's checkerboard.
    """

    half_width = 4.0
    cells_per_side = 4

    def __init__(self):
        self.cell_size = 2 * self.half_width / self.cells_per_side
        black = [(i, j) for i, j in itertools.product(range(self.cells_per_side), repeat=2) if (i + j) % 2 == 0]
        self.black_cell_corners = self.cell_size * torch.tensor(black, dtype=torch.float32) - self.half_width  # (8, 2)
        self.log_density = -math.log(len(black) * self.cell_size**2)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        device = generator.device
        cell = torch.randint(len(self.black_cell_corners), (n,), generator=generator, device=device)  # (n,)
        offset = self.cell_size * torch.rand(n, 2, generator=generator, device=device)  # (n, 2)
        return self.black_cell_corners.to(device)[cell] + offset

    def log_prob(self, x: Tensor) -> Tensor:
        cell_index = torch.floor((x + self.half_width) / self.cell_size)  # (n, 2)
        on_board = ((cell_index >= 0) & (cell_index < self.cells_per_side)).all(dim=-1)  # (n,)
        black = cell_index.sum(dim=-1) % 2 == 0  # (n,)
        log_density = torch.full_like(x[:, 0], self.log_density)
        return torch.where(on_board & black, log_density, -math.inf)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (-self.half_width, self.half_width, -self.half_width, self.half_width)


class NoisyCurve2D(Toy2D):
    """curve(t) + std * eps with t ~ U(t_range) and eps ~ N(0, I).

    Subclasses define `t_range` and `curve`; the density is the parameter-average of the noise
    kernel along the curve, integrated by the midpoint rule over `n_quadrature` nodes.
    """

    t_range: tuple[float, float]

    def __init__(self, std: float, n_quadrature: int):
        self.std = std
        self.n_quadrature = n_quadrature

    @abstractmethod
    def curve(self, t: Tensor) -> Tensor:
        """(...,) parameters -> (..., 2) points on the noiseless curve."""

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        device = generator.device
        t_min, t_max = self.t_range
        t = t_min + (t_max - t_min) * torch.rand(n, generator=generator, device=device)  # (n,)
        noise = torch.randn(n, 2, generator=generator, device=device)  # (n, 2)
        return self.curve(t) + self.std * noise

    def log_prob(self, x: Tensor) -> Tensor:
        return _log_mean_isotropic_gaussian(x, self.quadrature_centres().to(x), self.std)

    def quadrature_centres(self) -> Tensor:
        """(n_quadrature, 2) curve points at the midpoints of equal parameter cells (float64)."""
        t_min, t_max = self.t_range
        cell = (t_max - t_min) / self.n_quadrature
        t = t_min + cell * (torch.arange(self.n_quadrature, dtype=torch.float64) + 0.5)  # (Q,)
        return self.curve(t)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return _padded_box(self.quadrature_centres(), _BOUNDS_PAD_IN_STD * self.std)


class Moons(NoisyCurve2D):
    """sklearn's make_moons: two half circles, each drawn with probability 1/2, plus Gaussian noise.

    Upper moon (cos s, sin s) and lower moon (1 - cos s, 1/2 - sin s), s in [0, pi], are joined
    into one curve over t in [0, 2 pi) (t < pi: upper, s = t; else lower, s = t - pi), so a
    uniform t picks each moon with probability 1/2 and is uniform along it, as in sklearn.
    """

    t_range = (0.0, 2 * math.pi)

    def __init__(self, std: float = 0.05, n_quadrature: int = 2048):
        # An even node count splits exactly at t = pi: each moon gets the same quadrature.
        if n_quadrature % 2:
            raise ValueError(f"n_quadrature must be even, got {n_quadrature}")
        super().__init__(std, n_quadrature)

    def curve(self, t: Tensor) -> Tensor:
        upper = t < math.pi
        s = torch.where(upper, t, t - math.pi)
        x = torch.where(upper, s.cos(), 1 - s.cos())
        y = torch.where(upper, s.sin(), 0.5 - s.sin())
        return torch.stack([x, y], dim=-1)


class SwissRoll(NoisyCurve2D):
    """sklearn's make_swiss_roll in 2D, scaled by 1/5 as in FFJORD: t (cos t, sin t) / 5 with
    t ~ U(1.5 pi, 4.5 pi), plus Gaussian noise (std 0.2 is FFJORD's noise 1.0 before scaling)."""

    t_range = (1.5 * math.pi, 4.5 * math.pi)
    scale = 0.2

    def __init__(self, std: float = 0.2, n_quadrature: int = 2048):
        super().__init__(std, n_quadrature)

    def curve(self, t: Tensor) -> Tensor:
        return self.scale * t.unsqueeze(-1) * torch.stack([t.cos(), t.sin()], dim=-1)


TOY_DISTRIBUTIONS: dict[str, type[Toy2D]] = {
    "ring8": Ring8,
    "grid25": Grid25,
    "moons": Moons,
    "checkerboard": Checkerboard,
    "swissroll": SwissRoll,
}


def make_toy(name: str, **params) -> Toy2D:
    """Build the toy distribution registered as `name` with its constructor's `params`."""
    try:
        cls = TOY_DISTRIBUTIONS[name]
    except KeyError:
        raise ValueError(f"unknown toy distribution {name!r}; valid names: {', '.join(TOY_DISTRIBUTIONS)}") from None
    return cls(**params)


def _log_mean_isotropic_gaussian(x: Tensor, centres: Tensor, std: float) -> Tensor:
    """ln( mean_m N(x; centres[m], std^2 I) ): (n, 2), (M, 2) -> (n,).

    Coordinate differences are taken explicitly, not via the |x|^2 + |c|^2 - 2 x.c expansion
    (cdist's fast path), whose cancellation error in float32 is large next to a small std^2.
    Points go through in chunks so the (n, M) matrix stays bounded; in-place ops keep it to one.
    """
    log_normaliser = math.log(2 * math.pi * std**2) + math.log(len(centres))
    chunk = max(1, _MAX_PAIRS_PER_CHUNK // len(centres))
    log_probs = []
    for x_chunk in x.split(chunk):
        squared_dist = (x_chunk[:, :1] - centres[:, 0]).square_()  # (chunk, M)
        squared_dist += (x_chunk[:, 1:] - centres[:, 1]).square_()
        log_probs.append(torch.logsumexp(squared_dist.mul_(-0.5 / std**2), dim=-1) - log_normaliser)
    return torch.cat(log_probs)


def _padded_box(points: Tensor, pad: float) -> tuple[float, float, float, float]:
    """Bounding box of (M, 2) points grown by pad on every side."""
    low, high = points.min(dim=0).values - pad, points.max(dim=0).values + pad
    return (low[0].item(), high[0].item(), low[1].item(), high[1].item())
