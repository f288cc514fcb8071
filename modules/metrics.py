"""Sample-quality metrics shared by every generative family: tensor math only, no training, no files.

* `mode_coverage`: modes captured and high-quality fraction on 2-D Gaussian mixtures, the protocol
  of VEEGAN (Srivastava et al., NeurIPS 2017) and PacGAN (Lin et al., NeurIPS 2018).
* `frechet_distance`: the Fréchet distance between Gaussian fits of two feature sets, FID's formula
  (Heusel et al., NeurIPS 2017) in any feature space.
* `class_histogram_metrics`: how a classifier's verdicts on samples spread over the classes, as in
  the Stacked-MNIST protocol (Metz et al. 2017; VEEGAN; PacGAN): classes covered and
  KL(predicted histogram || reference histogram).
* `psnr`, `ssim`: per-image fidelity of a reconstruction to its reference (super-resolution), on
  images in [-1, 1] measured in the [0, 1] range (data range 1), as most SR papers report them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# VEEGAN / PacGAN: a sample is high quality within three standard deviations of its nearest mode.
HIGH_QUALITY_RADIUS_IN_STD = 3.0
# A class counts as covered when it receives at least this fraction of the samples, so that a few
# stray classifications of a collapsed model's samples do not count as coverage.
CLASS_COVERAGE_MIN_FRACTION = 0.01
# Weight of the uniform histogram mixed into the reference histogram before the KL (see below).
REFERENCE_SMOOTHING = 1e-6


def mode_coverage(samples: Tensor, modes: Tensor, std: float) -> dict[str, float | int]:
    """Modes captured and fraction of high-quality samples of a 2-D isotropic Gaussian mixture.

    Protocol. VEEGAN's synthetic experiments draw 2,500 samples from each trained generator on 2-D
    ring and grid mixtures; a sample is *high quality* when it lies within three standard deviations
    of the nearest mode, and a mode is *lost* when no generated sample lies within three standard
    deviations of it. PacGAN reports the same two numbers (plus a reverse KL) on its 2D-ring (8 modes
    on the unit circle, std 0.01) and 2D-grid (25 modes on {-4, -2, 0, 2, 4}^2, std 0.05), the
    settings of `toy2d.Ring8` and `toy2d.Grid25`.

    The rule implemented is the one in PacGAN's released evaluation code (github.com/fjxmlzn/PacGAN,
    `MetricLogger` in synthetic_data_experiments/PacGAN/pacgan/extensions.py), which fixes what the
    prose leaves open:

    1. each sample goes to its nearest mode in standardised distance ||x - mode|| / std;
    2. it is high quality when that distance is < 3;
    3. a mode is covered when at least one high-quality sample went to it (one suffices);
    4. high_quality_fraction = high-quality samples / all samples.

    Step 1's nearest-mode assignment and VEEGAN's "some sample within 3 std of the mode" agree when the
    3-std discs are disjoint, i.e. modes more than 6 std apart: ring8's are 76.5 std apart,
    grid25's 40. True samples are high quality with probability P(chi^2_2 < 9) = 1 - e^-4.5 = 98.89%.

    Args:
        samples: (N, 2) generated points; 2,500 is the papers' count.
        modes: (M, 2) mixture means.
        std: the components' common standard deviation.

    Returns:
        {"modes_covered": int, "high_quality_fraction": float}.
    """
    # float64 and exact differences (not cdist's |x|^2 + |m|^2 - 2 x.m shortcut, which cancels):
    # the < 3 std test must stay exact at distances of a few std = 0.01 from modes at |m| ~ 1-6.
    distance = torch.cdist(samples.double(), modes.double().to(samples.device),
                           compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    distance_in_std = distance / std
    nearest_distance, nearest_mode = distance_in_std.min(dim=1)  # (N,), (N,)
    high_quality = nearest_distance < HIGH_QUALITY_RADIUS_IN_STD  # (N,)
    return {
        "modes_covered": int(nearest_mode[high_quality].unique().numel()),
        "high_quality_fraction": high_quality.double().mean().item(),
    }


def gaussian_fit(features: Tensor) -> tuple[Tensor, Tensor]:
    """(N, F) features -> float64 mean (F,) and unbiased covariance (F, F), as FID's reference code.

    The features are centred before the product: accumulating raw second moments and subtracting
    N mean mean^T loses the covariance to cancellation when means are large next to spreads.
    """
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"expected (N, F) features with N >= 2, got shape {tuple(features.shape)}")
    x = features.detach().double()
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (len(x) - 1)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussian fits of two (N, F) feature sets (FID's formula).

    FID (Heusel et al. 2017) is this quantity on InceptionV3 pool features; here the feature
    space is the caller's (e.g. a digit classifier's penultimate layer). It is a squared distance,
    zero for identical sets, and a biased estimator: at equal true distributions it still grows
    like 1/N, so compare values computed with the same sample counts.
    """
    return frechet_distance_gaussians(*gaussian_fit(features_a), *gaussian_fit(features_b))


def frechet_distance_gaussians(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    d^2 = ||mean_a - mean_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2))
    (Dowson & Landau 1982; FID's formula).

    tr((A B)^(1/2)) is computed as sum_i sqrt(lambda_i(A^(1/2) B A^(1/2))), in float64: A B and
    A^(1/2) B A^(1/2) share their eigenvalues (XY and YX do, with X = A^(1/2), Y = A^(1/2) B), and
    the latter is symmetric positive semi-definite, so a symmetric eigen-solver gives real
    eigenvalues whose round-off negatives are clamped to 0. The usual sqrtm (or eigvals) of the
    non-symmetric product instead needs complex arithmetic and is unstable on the singular
    covariances that dead feature units or N <= F produce.
    """
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    sqrt_a = _psd_sqrt(cov_a)
    trace_sqrt_product = _psd_eigenvalues(sqrt_a @ cov_b @ sqrt_a).sqrt().sum()
    squared = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt_product
    # A squared distance: a negative value can only be round-off (~1e-12 relative), not signal.
    return max(squared.item(), 0.0)


def _psd_eigenvalues(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric positive semi-definite matrix, round-off negatives clamped to 0."""
    return torch.linalg.eigvalsh(_symmetrise(matrix)).clamp(min=0)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, via eigh."""
    eigenvalues, eigenvectors = torch.linalg.eigh(_symmetrise(matrix))
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _symmetrise(matrix: Tensor) -> Tensor:
    # Products like X B X are symmetric only up to round-off; eigh reads one triangle.
    return (matrix + matrix.T) / 2


def class_histogram_metrics(predicted_labels: Tensor, num_classes: int,
                            reference_histogram: Tensor) -> dict[str, float | int]:
    """Coverage and reverse KL of the class histogram of a classifier's verdicts on samples.

    The Stacked-MNIST protocol (Metz et al. 2017, used by VEEGAN and PacGAN) classifies generated
    samples with a pre-trained classifier, counts the classes (modes) hit and reports
    KL(predicted histogram || reference histogram), the "reverse" KL of PacGAN, small when samples
    fall into classes in the reference proportions.

    Args:
        predicted_labels: (N,) integer class predictions in [0, num_classes).
        num_classes: K, the number of histogram bins.
        reference_histogram: (K,) class frequencies (or counts) of the real data; normalised here.

    Returns:
        classes_covered: classes receiving >= 1% of the samples (a threshold, rather than the
            protocol's single sample, so that a few misclassified samples of a collapsed model do
            not count as coverage).
        class_kl: KL(p || q) in nats, p the predicted histogram and q the reference. Empty bins of
            p contribute 0 exactly (p ln p -> 0). An empty bin of q under predicted mass would make
            the KL infinite, so q is mixed with the uniform histogram at weight eps = 1e-6 first:
            such a bin then adds about p ln(p K / eps) (~16 nats at p = 1, K = 10), finite but far
            above any real mismatch. Bins that q fills are changed by a relative ~1e-6.
    """
    labels = predicted_labels.detach().long().flatten().cpu()
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"predicted_labels must be a non-empty set of classes in [0, {num_classes})")
    predicted = torch.bincount(labels, minlength=num_classes).double() / len(labels)  # (K,)
    reference = reference_histogram.detach().double().cpu()
    if reference.shape != (num_classes,) or (reference < 0).any() or reference.sum() <= 0:
        raise ValueError(f"reference_histogram must be {num_classes} non-negative frequencies, not all zero")
    reference = (1 - REFERENCE_SMOOTHING) * reference / reference.sum() + REFERENCE_SMOOTHING / num_classes
    return {
        "classes_covered": int((predicted >= CLASS_COVERAGE_MIN_FRACTION).sum()),
        "class_kl": torch.special.xlogy(predicted, predicted / reference).sum().item(),
    }


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(1 / MSE) on the [0, 1] range.

    Inputs are (B, C, H, W) in [-1, 1]; MSE in [0, 1] units is a quarter of it in [-1, 1] units.
    Identical images give +inf.
    """
    mse = ((images.double() - reference.double()) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def ssim(images: Tensor, reference: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image (Wang et al., IEEE TIP 2004), mean over channels and valid
    window positions: an 11x11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03, data range 1.

    Inputs are (B, C, H, W) in [-1, 1], mapped to [0, 1]. Images smaller than the window use a
    window of their size.
    """
    x = (images.double() + 1) / 2
    y = (reference.double() + 1) / 2
    window = min(window, x.shape[-1], x.shape[-2])
    offsets = torch.arange(window, dtype=torch.float64, device=x.device) - (window - 1) / 2
    kernel_1d = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum()
    channels = x.shape[1]
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(channels, 1, window, window)

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)
