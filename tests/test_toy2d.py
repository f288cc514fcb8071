"""2D toy distributions: normalised densities that match their samplers."""

import math

import pytest
import torch

from stagediff.modules.toy2d import TOY_DISTRIBUTIONS, Grid25, Moons, Ring8, SwissRoll, Toy2D, make_toy

NAMES = list(TOY_DISTRIBUTIONS)
N_SAMPLES = 10_000
HISTOGRAM_BINS = 16  # per axis, over each distribution's bounds
# Largest side of the fine midpoint cells that integrate each density: at most std / 1.25 for the
# Gaussian-based ones, where the rectangle rule is then exact to ~1e-13 over the plane (Poisson
# summation). Each axis gets a whole number of cells per histogram bin, so cells tile bins exactly;
# the checkerboard's 0.25 also makes them tile its squares.
MAX_CELL_SIDE = {"ring8": 0.008, "grid25": 0.04, "moons": 0.04, "checkerboard": 0.25, "swissroll": 0.16}


class DensityGrid:
    """A distribution's density on a fine midpoint grid over its bounds."""

    def __init__(self, dist: Toy2D, max_cell_side: float):
        x_min, x_max, y_min, y_max = dist.bounds
        x_mid = _cell_midpoints(x_min, x_max, max_cell_side)  # (Fx,)
        y_mid = _cell_midpoints(y_min, y_max, max_cell_side)  # (Fy,)
        self.log_prob = dist.log_prob(torch.cartesian_prod(x_mid, y_mid)).reshape(len(x_mid), len(y_mid))  # (Fx, Fy)
        self.cell_area = (x_max - x_min) * (y_max - y_min) / (len(x_mid) * len(y_mid))
        self.mass = self.log_prob.exp() * self.cell_area  # (Fx, Fy)

    def bin_mass(self) -> torch.Tensor:
        """(HISTOGRAM_BINS, HISTOGRAM_BINS) probability of each histogram bin."""
        b = HISTOGRAM_BINS
        return self.mass.reshape(b, self.mass.shape[0] // b, b, self.mass.shape[1] // b).sum(dim=(1, 3))

    def entropy(self) -> torch.Tensor:
        """-integral of p ln p, by the same midpoint rule."""
        # p ln p -> 0 where p = 0 (checkerboard's white squares, where ln p = -inf).
        return -torch.where(self.mass > 0, self.mass * self.log_prob, 0.0).sum()


def _cell_midpoints(low: float, high: float, max_cell_side: float) -> torch.Tensor:
    """Midpoints of equal cells splitting [low, high] into a multiple of HISTOGRAM_BINS cells."""
    cells = HISTOGRAM_BINS * math.ceil((high - low) / (HISTOGRAM_BINS * max_cell_side))
    return low + (high - low) * (torch.arange(cells, dtype=torch.float64) + 0.5) / cells


@pytest.fixture(scope="module")
def grids() -> dict[str, DensityGrid]:
    return {name: DensityGrid(make_toy(name), MAX_CELL_SIDE[name]) for name in NAMES}


@pytest.fixture(scope="module")
def samples() -> dict[str, torch.Tensor]:
    return {name: make_toy(name).sample(N_SAMPLES, torch.Generator().manual_seed(0)).double() for name in NAMES}


def _histogram(points: torch.Tensor, bounds: tuple[float, float, float, float]) -> torch.Tensor:
    """(HISTOGRAM_BINS, HISTOGRAM_BINS) counts of (n, 2) points, x first; points off the box are dropped."""
    x_min, x_max, y_min, y_max = bounds
    low = torch.tensor([x_min, y_min], dtype=points.dtype)
    width = torch.tensor([x_max - x_min, y_max - y_min], dtype=points.dtype)
    bin_index = torch.floor((points - low) / width * HISTOGRAM_BINS).long()  # (n, 2)
    inside = ((bin_index >= 0) & (bin_index < HISTOGRAM_BINS)).all(dim=-1)
    flat_index = bin_index[inside, 0] * HISTOGRAM_BINS + bin_index[inside, 1]
    return torch.bincount(flat_index, minlength=HISTOGRAM_BINS**2).reshape(HISTOGRAM_BINS, HISTOGRAM_BINS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.numerics
def test_density_integrates_to_one(grids, name):
    assert grids[name].mass.sum().item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.numerics
def test_sample_histogram_matches_density(grids, samples, name):
    observed = _histogram(samples[name], make_toy(name).bounds).flatten().double()
    expected = N_SAMPLES * grids[name].bin_mass().flatten()
    # Pearson's chi-square wants >= 5 expected per bin: sparse bins (and the off-box remainder)
    # are pooled, the pool's expectation floored at 5 so a near-empty pool neither divides by
    # ~0 nor lets stray samples through unnoticed.
    dense = expected >= 5
    pooled_observed = N_SAMPLES - observed[dense].sum()
    pooled_expected = (N_SAMPLES - expected[dense].sum()).clamp(min=5.0)
    chi_square = ((observed[dense] - expected[dense]).pow(2) / expected[dense]).sum()
    chi_square += (pooled_observed - pooled_expected).pow(2) / pooled_expected
    dof = dense.sum().item()  # dense bins + pool - 1
    assert chi_square.item() < dof + 5 * math.sqrt(2 * dof)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.numerics
def test_mean_log_prob_of_samples_matches_grid_entropy(grids, samples, name):
    neg_log_prob = -make_toy(name).log_prob(samples[name])  # (n,)
    standard_error = neg_log_prob.std() / math.sqrt(N_SAMPLES)
    assert abs(neg_log_prob.mean() - grids[name].entropy()) < 5 * standard_error + 1e-3


@pytest.mark.numerics
def test_ring8_modes_are_evenly_spaced_on_the_circle():
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    expected = 2.5 * torch.stack([angles.cos(), angles.sin()], dim=-1)
    torch.testing.assert_close(Ring8(radius=2.5).modes.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(Ring8().modes[[0, 2, 4, 6]], torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    assert Ring8().std == 0.01


def test_grid25_modes_are_the_even_lattice():
    expected = [(a, b) for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)]
    assert sorted(map(tuple, Grid25().modes.tolist())) == expected
    assert Grid25().std == 0.05


@pytest.mark.parametrize("name", ["ring8", "grid25"])
@pytest.mark.numerics
def test_mixture_samples_lie_within_3_std_of_nearest_mode_at_gaussian_rate(name):
    mixture = make_toy(name)
    points = mixture.sample(N_SAMPLES, torch.Generator().manual_seed(1))  # (n, 2)
    nearest_mode_dist = torch.cdist(points.double(), mixture.modes.double()).min(dim=-1).values  # (n,)
    # The norm of a 2D standard normal exceeds 3 with probability exp(-9 / 2).
    expected_rate = 1 - math.exp(-4.5)
    rate = (nearest_mode_dist < 3 * mixture.std).double().mean().item()
    assert rate == pytest.approx(expected_rate, abs=5 * math.sqrt(expected_rate * (1 - expected_rate) / N_SAMPLES))


@pytest.mark.numerics
def test_checkerboard_density_is_constant_on_black_squares_and_zero_elsewhere():
    points = torch.tensor([[-3.0, -3.0], [1.0, 1.0], [-1.0, 3.0], [3.5, -0.5], [-1.0, -3.0], [4.5, 0.5], [0.0, 5.0]])
    expected = torch.tensor([-math.log(32)] * 4 + [-math.inf] * 3)
    torch.testing.assert_close(make_toy("checkerboard").log_prob(points), expected)


@pytest.mark.parametrize("cls", [Moons, SwissRoll])
@pytest.mark.numerics
def test_curve_density_quadrature_has_converged(cls):
    points = cls().sample(500, torch.Generator().manual_seed(2)).double()
    coarse, fine = cls().log_prob(points), cls(n_quadrature=4 * 2048).log_prob(points)
    torch.testing.assert_close(coarse, fine, atol=5e-3, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_determined_by_the_generator_alone(name):
    dist = make_toy(name)
    global_rng_state = torch.get_rng_state()

    first = dist.sample(100, torch.Generator().manual_seed(3))
    again = dist.sample(100, torch.Generator().manual_seed(3))
    other = dist.sample(100, torch.Generator().manual_seed(4))

    assert first.shape == (100, 2) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_rng_state)
    assert dist.log_prob(first).shape == (100,)


def test_make_toy_forwards_params():
    ring = make_toy("ring8", radius=3.0, std=0.1)
    assert isinstance(ring, Ring8) and ring.std == 0.1
    assert ring.modes[0].tolist() == [3.0, 0.0]


def test_unknown_name_error_lists_valid_names():
    with pytest.raises(ValueError, match="unknown toy distribution 'rings'") as error:
        make_toy("rings")
    for name in NAMES:
        assert name in str(error.value)
