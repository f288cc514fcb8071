"""ProGAN's multi-scale sliced Wasserstein distance (Karras et al. 2018, appendix D): the library
against a float64 loop computation of the reference's steps with the same random draws, and its
known behaviours on crops of a real photograph (blur and noise raise it far above the floor that
identical sets score)."""

import math
import re
from itertools import pairwise

import numpy as np
import pytest
import skimage.data
import torch

from stagediff.modules.metrics import laplacian_pyramid, sliced_wasserstein_distance
from stagediff.modules.sr import gaussian_blur

from helpers import generator

FLOAT32_ROUNDOFF, FLOAT64_ROUNDOFF = 2.0 ** -24, 2.0 ** -53  # unit round-off u
ROUNDOFF = {torch.float32: FLOAT32_ROUNDOFF, torch.float64: FLOAT64_ROUNDOFF}


pytestmark = pytest.mark.usefixtures("single_thread")


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term sum or dot product
    rounded to unit round-off u, in any summation order (so on any CPU's kernels)."""
    return n * u / (1 - n * u)


# ----------------------------------------------------------------------------- float64 loop oracle

BINOMIAL = [w / 16 for w in (1, 4, 6, 4, 1)]  # cv2.pyrDown's taps, per axis


def mirror(i: int, n: int) -> int:
    """scipy.ndimage's "mirror" boundary (the reference's): reflect about the edge sample, not repeating it."""
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def pyr_down(plane: list[list[float]]) -> list[list[float]]:
    """G_k+1[y][x] = sum_ij w_i w_j G_k[2y + i - 2][2x + j - 2], mirror boundary, ceil(h/2) x ceil(w/2)."""
    h, w = len(plane), len(plane[0])
    return [[sum(BINOMIAL[i] * BINOMIAL[j] * plane[mirror(2 * y + i - 2, h)][mirror(2 * x + j - 2, w)]
                 for i in range(5) for j in range(5))
             for x in range((w + 1) // 2)] for y in range((h + 1) // 2)]


def pyr_up(plane: list[list[float]], h: int, w: int) -> list[list[float]]:
    """The (h, w) grid holding `plane` at its even rows and columns and zeros elsewhere, filtered by
    4 w_i w_j with the mirror boundary."""
    grid = [[plane[y // 2][x // 2] if y % 2 == 0 and x % 2 == 0 else 0.0 for x in range(w)] for y in range(h)]
    return [[4 * sum(BINOMIAL[i] * BINOMIAL[j] * grid[mirror(y + i - 2, h)][mirror(x + j - 2, w)]
                     for i in range(5) for j in range(5))
             for x in range(w)] for y in range(h)]


def laplacian_planes(plane: list[list[float]], num_levels: int) -> list[list[list[float]]]:
    """Level k = G_k - pyrUp(G_k+1); the last level is the Gaussian G_(num_levels - 1)."""
    gaussians = [plane]
    for _ in range(num_levels - 1):
        gaussians.append(pyr_down(gaussians[-1]))
    levels = []
    for fine, coarse in pairwise(gaussians):
        up = pyr_up(coarse, len(fine), len(fine[0]))
        levels.append([[f - v for f, v in zip(row_f, row_v)] for row_f, row_v in zip(fine, up)])
    return levels + [gaussians[-1]]


def oracle_pyramid(images: torch.Tensor, num_levels: int) -> list[np.ndarray]:
    """(N, C, H, W) -> float64 arrays per level, finest first, from the loops above."""
    n, c = images.shape[:2]
    planes = [[laplacian_planes(images[i, k].double().tolist(), num_levels) for k in range(c)] for i in range(n)]
    return [np.array([[planes[i][k][level] for k in range(c)] for i in range(n)]) for level in range(num_levels)]


def pyramid_error(level: int, num_levels: int, max_image: float, u: float) -> float:
    """Bound on a pyramid level's error at unit round-off u. A 25-tap filter with non-negative
    weights summing to 1 errs by gamma_25 max|input| and does not amplify its input's error, so the
    Gaussian level k errs by k gamma_25 X (X = max|image|), pyrUp of level k + 1 by (k + 2) gamma_25 X,
    and the Laplacian level k, after the subtraction (|level| <= 2X), by ((2k + 2) gamma_25 + 2u) X."""
    if level == num_levels - 1:
        return level * gamma(25, u) * max_image
    return ((2 * level + 2) * gamma(25, u) + 2 * u) * max_image


def descriptor_statistics(level_array: np.ndarray, tops: list[int], lefts: list[int], patches_per_image: int,
                          patch_size: int) -> dict:
    """The patches at (top, left) of each image in turn, standardised per channel by this set's mean
    and (population) std, as (M, C * p * p) descriptors in channel, row, column order, with the
    per-channel quantities the round-off bound needs."""
    patches = np.array([level_array[m // patches_per_image, :, top:top + patch_size, left:left + patch_size]
                        for m, (top, left) in enumerate(zip(tops, lefts))])  # (M, C, p, p)
    channels = patches.shape[1]
    values = [[v for patch in patches for v in patch[k].ravel().tolist()] for k in range(channels)]
    means = [sum(vs) / len(vs) for vs in values]
    stds = [math.sqrt(sum((v - mean) ** 2 for v in vs) / len(vs)) for vs, mean in zip(values, means)]
    descriptors = [[(v - means[k]) / stds[k] for k in range(channels) for v in patch[k].ravel().tolist()]
                   for patch in patches]
    return {"descriptors": descriptors, "count": len(values[0]), "stds": stds,
            "mean_abs": [sum(abs(v) for v in vs) / len(vs) for vs in values],
            "max_centred": [max(abs(v - mean) for v in vs) for vs, mean in zip(values, means)],
            "max_norm": max(math.sqrt(sum(v * v for v in d)) for d in descriptors)}


def projection_error(stats: dict, level_error: float, u: float) -> float:
    """First-order bound on a projection's error at unit round-off u, following each step:
    * mean over n values: the level's error, plus gamma_n+1 mean|x|; centring: u |x - mean| more;
    * std: the RMS of the centred values moves by at most their largest error; its n-term mean of
      squares and the sqrt add (gamma_n+2 / 2 + u) std;
    * descriptor d = centred / std: centred error / std + |d| (std error / std + u);
    * projection on a direction normalised at u (gamma_D+2 off in norm): gamma_D |d| + the
      descriptor error's norm (<= sqrt(D) times its largest) + gamma_D+2 |d|."""
    n, dim = stats["count"], len(stats["descriptors"][0])
    descriptor_error = 0.0
    for std, mean_abs, max_centred in zip(stats["stds"], stats["mean_abs"], stats["max_centred"]):
        centred_error = 2 * level_error + gamma(n + 1, u) * mean_abs + u * max_centred
        std_error = centred_error + (gamma(n + 2, u) / 2 + u) * std
        descriptor_error = max(descriptor_error, centred_error / std + max_centred / std * (std_error / std + u))
    return (gamma(dim, u) + gamma(dim + 2, u)) * stats["max_norm"] + math.sqrt(dim) * descriptor_error


def oracle_swd(images_a: torch.Tensor, images_b: torch.Tensor, num_levels: int, patches_per_image: int,
               patch_size: int, num_projections: int, seed: int, u: float) -> dict[str, tuple[float, float]]:
    """{key: (SWD x 10^3, bound on |computed at u - exact| + |this float64 loop - exact|, x 10^3)}.

    The random draws are the library's, replayed in its documented order from the same seed: per
    level, patch rows and columns of a, then of b, then the raw (float32) Gaussian directions.
    """
    g = generator(seed)
    max_image = max(images_a.abs().max().item(), images_b.abs().max().item())
    pyramids = {"a": oracle_pyramid(images_a, num_levels), "b": oracle_pyramid(images_b, num_levels)}
    result = {}
    for level in range(num_levels):
        level_h, level_w = pyramids["a"][level].shape[-2:]
        stats = {}
        for name in ("a", "b"):
            count = images_a.shape[0] * patches_per_image
            tops = torch.randint(0, level_h - patch_size + 1, (count,), generator=g).tolist()
            lefts = torch.randint(0, level_w - patch_size + 1, (count,), generator=g).tolist()
            stats[name] = descriptor_statistics(pyramids[name][level], tops, lefts, patches_per_image, patch_size)
        raw = torch.randn(num_projections, len(stats["a"]["descriptors"][0]), generator=g).double().tolist()
        total = 0.0
        for row in raw:
            norm = math.sqrt(sum(t * t for t in row))
            theta = [t / norm for t in row]
            projected_a, projected_b = ([sum(t * v for t, v in zip(theta, d)) for d in stats[name]["descriptors"]]
                                        for name in ("a", "b"))
            projected_a, projected_b = sorted(projected_a), sorted(projected_b)
            total += sum(abs(p - q) for p, q in zip(projected_a, projected_b)) / len(projected_a)
        distance = total / num_projections
        bound = 0.0
        for roundoff in (u, FLOAT64_ROUNDOFF):  # the computation checked, then this loop's own
            level_error = pyramid_error(level, num_levels, max_image, roundoff)
            # Sorting is 1-Lipschitz in the max norm, so each sorted difference errs by at most the two
            # projections' bounds; the means over M K / r terms and r batches add gamma relative.
            bound += (projection_error(stats["a"], level_error, roundoff)
                      + projection_error(stats["b"], level_error, roundoff)
                      + gamma(len(raw) * len(stats["a"]["descriptors"]) + 2, roundoff) * distance)
        key = f"swd_{level_h}" if level_h == level_w else f"swd_{level_h}x{level_w}"
        result[key] = (1e3 * distance, 1e3 * bound)
    return result


def textured_images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Images in [-1, 1] with structure at every scale: smooth waves plus pixel noise."""
    n, c, h, w = shape
    g = generator(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(n, c, 1, 1, generator=g) * 2 * math.pi
    smooth = torch.sin(3 * x + 2 * y + phase) * torch.cos(5 * y - x)
    return (0.6 * smooth + 0.4 * (torch.rand(shape, generator=g) * 2 - 1)).clamp(-1, 1)


ORACLE_CASES = {
    # Square, powers of two: the reference's own setting, two levels (32, 16).
    "rgb_32": (2, 3, 32, 32),
    # Odd and non-square, one channel: ceil halving (35x33 -> 18x17) and pyrUp onto an odd grid.
    "gray_35x33": (2, 1, 35, 33),
}


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_laplacian_pyramid_matches_the_loop_definition(case):
    images = textured_images(ORACLE_CASES[case], seed=1)
    max_image = images.abs().max().item()
    expected = oracle_pyramid(images, num_levels=3)
    for level, (ours, reference) in enumerate(zip(laplacian_pyramid(images, 3), expected)):
        assert ours.shape == reference.shape
        # Wrong boundaries (replicate, zero, circular) move border values by 0.13-0.88; the bound is ~5e-6.
        tolerance = pyramid_error(level, 3, max_image, FLOAT32_ROUNDOFF) + pyramid_error(level, 3, max_image,
                                                                                         FLOAT64_ROUNDOFF)
        assert np.abs(ours.double().numpy() - reference).max() <= tolerance, level


def test_loop_pyramid_is_the_reference_scipy_pyramid():
    """The oracle's pyrDown / pyrUp agree with the reference's formulation (scipy.ndimage.convolve,
    mode "mirror", onto the 2x grid) where that applies: even sizes."""
    ndimage = pytest.importorskip("scipy.ndimage")
    images = textured_images(ORACLE_CASES["rgb_32"], seed=1).double().numpy()
    kernel = np.outer(BINOMIAL, BINOMIAL)[None, None]  # (1, 1, 5, 5): per image and channel
    gaussians = [images]
    for _ in range(2):
        gaussians.append(ndimage.convolve(gaussians[-1], kernel, mode="mirror")[:, :, ::2, ::2])
    reference = []
    for fine, coarse in pairwise(gaussians):
        grid = np.zeros_like(fine)
        grid[:, :, ::2, ::2] = coarse
        reference.append(fine - ndimage.convolve(grid, 4 * kernel, mode="mirror"))
    reference.append(gaussians[-1])
    for ours, theirs in zip(oracle_pyramid(torch.from_numpy(images), 3), reference):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_swd_matches_a_float64_loop_computation_with_the_same_draws(case, dtype):
    shape = ORACLE_CASES[case]
    images_a, images_b = textured_images(shape, seed=1).to(dtype), textured_images(shape, seed=2).to(dtype)
    settings = {"patches_per_image": 8, "patch_size": 7, "num_projections": 16}
    expected = oracle_swd(images_a, images_b, num_levels=2, seed=5, u=ROUNDOFF[dtype], **settings)
    ours = sliced_wasserstein_distance(images_a, images_b, repeats=2, generator=generator(5), **settings)
    assert list(ours) == [*expected, "swd"]
    for key, (value, bound) in expected.items():
        # The float32 bound is 1-2% of the value (measured errors ~1e-7 relative); wrong variants are
        # off by more at some level of each case: no standardisation ~70%, directions left unnormalised
        # (Gaussian / 12) 3% and 43%. The float64 bound (~1e-10) rejects even the sample std (ddof 1, 6e-4).
        assert bound < 0.025 * value
        assert ours[key] == pytest.approx(value, rel=0, abs=bound), key
    mean = sum(value for value, _ in expected.values()) / len(expected)
    assert ours["swd"] == pytest.approx(mean, rel=0, abs=max(bound for _, bound in expected.values()))


# ----------------------------------------------------------------------------- behaviour on photographs

CROPS, CROP_SIZE = 32, 64  # levels 64, 32, 16; 4,096 descriptors per level and set
PROJECTIONS = 128  # a quarter of the paper's 512: the same expectation, 4x faster sorts
FINEST = f"swd_{CROP_SIZE}"
BLUR_SIGMAS = (1.0, 2.0)  # pixels
NOISE_STD = 0.05  # in [-1, 1] units: 6.4 8-bit levels


def astronaut_crops(seed: int) -> torch.Tensor:
    """(CROPS, 3, CROP_SIZE, CROP_SIZE) crops at random positions of skimage's astronaut photograph."""
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1  # (3, 512, 512)
    g = generator(seed)
    corners = torch.randint(0, photo.shape[-1] - CROP_SIZE + 1, (CROPS, 2), generator=g).tolist()
    return torch.stack([photo[:, top:top + CROP_SIZE, left:left + CROP_SIZE] for top, left in corners])


def swd(images_a: torch.Tensor, images_b: torch.Tensor, seed: int) -> dict[str, float]:
    return sliced_wasserstein_distance(images_a, images_b, num_projections=PROJECTIONS, generator=generator(seed))


@pytest.fixture(scope="module")
def photo_distances() -> dict[str, dict[str, float]]:
    """Two independent crop draws a and b; every comparison of b's variants uses one patch and
    direction draw (seed 3), so their differences come from the images alone."""
    a, b = astronaut_crops(seed=100), astronaut_crops(seed=200)
    noisy = (b + NOISE_STD * torch.randn(b.shape, generator=generator(7))).clamp(-1, 1)
    distances = {
        "a_a_seed1": swd(a, a, seed=1), "a_a_seed2": swd(a, a, seed=2),  # identical sets: the sampling floor
        "a_b": swd(a, b, seed=3), "b_a": swd(b, a, seed=3), "a_b_again": swd(a, b, seed=3),
        "noise": swd(a, noisy, seed=3),
    }
    for sigma in BLUR_SIGMAS:
        distances[f"blur_{sigma}"] = swd(a, gaussian_blur(b, sigma), seed=3)
    return distances


def test_blur_and_noise_raise_the_finest_level_far_above_the_identical_set_floor(photo_distances):
    """Thresholds from 16 other crop draws, each with its own patch seeds (measured minima in
    brackets): blur 1 px > a vs b (by >= 17.7), blur 2 px > 1.3x blur 1 px (1.39), blur 2 px and
    noise > 1.5x a vs b (1.94, 1.74), and both > 3x the identical-set floor (3.27; floor 30-36).
    This draw: floor 32.6, a vs b 70.8, blur 1 px 92.2, blur 2 px 156.9, noise 177.7."""
    d = {name: values[FINEST] for name, values in photo_distances.items()}
    floor = max(d["a_a_seed1"], d["a_a_seed2"])
    assert d["a_b"] < d["blur_1.0"] < d["blur_2.0"]  # more blur, higher
    assert d["blur_2.0"] > 1.3 * d["blur_1.0"]
    assert d["blur_2.0"] > 1.5 * d["a_b"] and d["noise"] > 1.5 * d["a_b"]
    assert 3 * floor < min(d["blur_2.0"], d["noise"])


def test_swd_is_symmetric_up_to_sampling_noise_and_deterministic_per_generator(photo_distances):
    """Swapping the sets gives each the other's patch positions: the value moves by sampling noise,
    by at most 0.50x the identical-set floor at any level in 16 other crop draws (0.33x here)."""
    assert photo_distances["a_b_again"] == photo_distances["a_b"]
    for key in photo_distances["a_b"]:
        floor = min(photo_distances["a_a_seed1"][key], photo_distances["a_a_seed2"][key])
        assert abs(photo_distances["a_b"][key] - photo_distances["b_a"][key]) < floor, key


@pytest.mark.parametrize("level", [0.5, 0.3])
def test_flat_images_score_finite_values(level):
    """A set without spread: the reference divides by 0 there (NaN). Flat 0.5 images have exactly
    zero Laplacian levels; flat 0.3 ones round-off of ~3e-8, which SWD_STD_FLOOR (1e-6) keeps at
    descriptors <= ~0.05. Against photographs they score as far as descriptors of ~0 are from
    standardised ones (E|projection| ~ 0.8, so ~800); against themselves far below the photographs'
    own sampling floor (15-35 at these sizes)."""
    photos = astronaut_crops(seed=100)[:8]
    flat = torch.full_like(photos, level)
    against_photos = swd(photos, flat, seed=1)
    assert all(math.isfinite(v) and v > 300 for v in against_photos.values()), against_photos
    against_itself = swd(flat, flat, seed=1)
    assert all(v < 5 for v in against_itself.values()), against_itself


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape_a, shape_b, message", [
    ((2, 3, 32, 32), (2, 1, 32, 32), "(2, 3, 32, 32) and (2, 1, 32, 32)"),  # channels differ
    ((2, 3, 32, 32), (4, 3, 32, 32), "(2, 3, 32, 32) and (4, 3, 32, 32)"),  # counts differ
    ((3, 32, 32), (3, 32, 32), "(3, 32, 32) and (3, 32, 32)"),  # not a batch
    ((2, 3, 15, 32), (2, 3, 15, 32), "(2, 3, 15, 32) are smaller than min_resolution 16"),
])
def test_bad_shapes_raise_a_value_error_naming_them(shape_a, shape_b, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sliced_wasserstein_distance(torch.zeros(shape_a), torch.zeros(shape_b))


def test_bad_settings_raise_value_errors():
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="must divide"):
        sliced_wasserstein_distance(images, images, num_projections=10, repeats=4)
    with pytest.raises(ValueError, match="patch_size 17, min_resolution 16"):
        sliced_wasserstein_distance(images, images, patch_size=17)
