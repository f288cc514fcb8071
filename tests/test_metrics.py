"""Evaluation metrics: mode coverage, Fréchet distance, class histograms, the cached feature classifier."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.image.fid import FrechetInceptionDistance

from stagediff.modules.classifier import ImageClassifier
from stagediff.modules.metrics import (REFERENCE_SMOOTHING, class_histogram_metrics, frechet_distance,
                                       frechet_distance_gaussians, mode_coverage)
from stagediff.modules.toy2d import make_toy
from stagediff.pipelines import evaluation
from stagediff.pipelines.data import DataConfig, DataSplits, InMemoryDataset, load_data
from stagediff.pipelines.evaluation import (ClassifierRecipe, classifier_cache_key, get_feature_classifier,
                                            image_metrics, image_outputs, toy_metrics, train_test_floor)

from helpers import generator

PAPER_SAMPLE_COUNT = 2500  # VEEGAN / PacGAN
# A true sample is high quality with probability P(chi^2_2 < 9) = 1 - e^-4.5.
TRUE_HIGH_QUALITY = 1 - math.exp(-4.5)
# 4 binomial standard deviations of a fraction near TRUE_HIGH_QUALITY over PAPER_SAMPLE_COUNT samples.
HIGH_QUALITY_TOLERANCE = 4 * math.sqrt(TRUE_HIGH_QUALITY * (1 - TRUE_HIGH_QUALITY) / PAPER_SAMPLE_COUNT)


pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- mode coverage


@pytest.mark.parametrize("name, num_modes", [("ring8", 8), ("grid25", 25)])
@pytest.mark.numerics
def test_true_samples_cover_every_mode_at_the_chi2_rate(name, num_modes):
    toy = make_toy(name)
    result = mode_coverage(toy.sample(PAPER_SAMPLE_COUNT, generator()), toy.modes, toy.std)
    assert result["modes_covered"] == num_modes
    assert result["high_quality_fraction"] == pytest.approx(TRUE_HIGH_QUALITY, abs=HIGH_QUALITY_TOLERANCE)


@pytest.mark.numerics
def test_collapsed_sampler_covers_one_mode():
    toy = make_toy("ring8")
    samples = toy.modes[3] + toy.std * torch.randn(PAPER_SAMPLE_COUNT, 2, generator=generator())
    result = mode_coverage(samples, toy.modes, toy.std)
    assert result["modes_covered"] == 1
    assert result["high_quality_fraction"] == pytest.approx(TRUE_HIGH_QUALITY, abs=HIGH_QUALITY_TOLERANCE)


@pytest.mark.numerics
def test_uniform_noise_is_low_quality():
    toy = make_toy("ring8")
    samples = 3 * torch.rand(PAPER_SAMPLE_COUNT, 2, generator=generator()) - 1.5  # the ring's box [-1.5, 1.5]^2
    # Expected: 8 discs of radius 3 std over the box's area, 8 pi 0.03^2 / 9 = 0.25%.
    assert mode_coverage(samples, toy.modes, toy.std)["high_quality_fraction"] < 0.01


@pytest.mark.numerics
def test_high_quality_is_strictly_within_three_std_of_the_nearest_mode():
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    samples = torch.tensor([[2.9, 0.0], [10.0, 3.1], [5.0, 0.0]])  # inside mode 0; outside mode 1; between
    assert mode_coverage(samples, modes, std=1.0) == {"modes_covered": 1, "high_quality_fraction": pytest.approx(1 / 3)}


# ----------------------------------------------------------------------------- Fréchet distance


def closed_form_commuting(mean_a, variances_a, mean_b, variances_b) -> float:
    """FD for covariances Q diag(v) Q^T sharing eigenvectors: |m_a - m_b|^2 + sum (sqrt v_a - sqrt v_b)^2."""
    return ((mean_a - mean_b).square().sum() + (variances_a.sqrt() - variances_b.sqrt()).square().sum()).item()


@pytest.mark.numerics
def test_fd_of_gaussians_matches_the_closed_form_for_commuting_covariances():
    g = generator()
    dim = 6
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    mean_a, mean_b = torch.randn(2, dim, generator=g, dtype=torch.float64)
    variances_a, regular_b = torch.rand(2, dim, generator=g, dtype=torch.float64) + 0.1
    singular_b = regular_b.clone()
    singular_b[0] = 0.0  # a singular covariance is allowed
    eps = torch.finfo(torch.float64).eps
    for variances_b in (singular_b, regular_b):
        cov_a, cov_b = (rotation * variances_a) @ rotation.T, (rotation * variances_b) @ rotation.T
        expected = closed_form_commuting(mean_a, variances_a, mean_b, variances_b)
        # The tolerance is a forward-error bound from the conditioning, not one machine's result (LAPACK
        # builds and CPUs round eigh differently). A symmetric eigensolver is backward stable, error
        # p eps |A| with p = 4 dim here. sqrt has Frechet derivative 1 / (2 sqrt(lambda_min(A))) at A, so
        # A^(1/2) errs by p eps |A| / (2 sqrt(lambda_min(A))), M = A^(1/2) B A^(1/2) by p eps |A| |B|
        # (sqrt(cond A) + 1), and each eigenvalue mu of M by delta = p eps |A| |B| (sqrt(cond A) + 2)
        # (Weyl). sqrt(mu) then errs by delta / (2 sqrt(mu)), or by sqrt(delta) where mu = 0: B's zero
        # variance costs sqrt(eps)-sized accuracy. Bounds: 2.8e-7 (8e-9 relative) singular, measured
        # 2.7e-9 on an AMD EPYC under every ATEN_CPU_CAPABILITY and 1.5e-8 on an Intel Xeon; 3.4e-13
        # regular, measured 7e-15. A wrong formula is off by O(1).
        norm_a, norm_b = variances_a.max().item(), variances_b.max().item()
        delta = 4 * dim * eps * norm_a * norm_b * (math.sqrt(norm_a / variances_a.min().item()) + 2)
        sqrt_error = sum(delta / (2 * math.sqrt(mu)) if mu > delta else math.sqrt(delta)
                         for mu in (variances_a * variances_b).tolist())
        traces = (mean_a - mean_b).square().sum() + variances_a.sum() + variances_b.sum()
        tolerance = 2 * sqrt_error + dim * eps * traces.item()
        assert frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=0, abs=tolerance)


@pytest.mark.numerics
def test_fd_of_gaussian_samples_approaches_the_closed_form():
    g = generator()
    mean_a, mean_b = torch.zeros(4), torch.tensor([1.0, 0.0, -0.5, 2.0])
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 3.0])
    features_a = mean_a + std_a * torch.randn(50_000, 4, generator=g)
    features_b = mean_b + std_b * torch.randn(50_000, 4, generator=g)
    expected = closed_form_commuting(mean_a, std_a**2, mean_b, std_b**2)  # 7.5
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=0.02)


@pytest.mark.numerics
def test_fd_is_zero_for_identical_sets_and_the_squared_shift_for_shifted_ones():
    features = torch.randn(300, 64, generator=generator()).relu()  # dead-ish units, singular-ish covariance
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    direction = torch.randn(64, generator=generator(1))
    # A shift leaves the covariance unchanged, so FD is exactly the squared shift: growing as its square.
    for scale in (0.1, 1.0, 10.0):
        shift = scale * direction
        assert frechet_distance(features, features + shift) == pytest.approx(shift.square().sum().item(), rel=1e-5)


def test_fd_needs_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# ----------------------------------------------------------------------------- class histograms


@pytest.mark.numerics
def test_one_class_histogram_against_uniform_reference():
    result = class_histogram_metrics(torch.full((500,), 3), 10, torch.full((10,), 0.1))
    assert result["classes_covered"] == 1
    assert result["class_kl"] == pytest.approx(math.log(10), rel=1e-5)  # KL(delta || uniform) = ln K


@pytest.mark.numerics
def test_matching_histogram_has_zero_kl_and_full_coverage():
    labels = torch.arange(10).repeat(50)
    result = class_histogram_metrics(labels, 10, torch.bincount(labels))  # counts are normalised
    assert result == {"classes_covered": 10, "class_kl": pytest.approx(0.0, abs=1e-5)}


@pytest.mark.numerics
def test_coverage_threshold_and_empty_reference_bins():
    labels = torch.tensor([0] * 199 + [1])  # class 1 gets 0.5% < 1%
    reference = torch.tensor([1.0, 0.0, 0.0])
    result = class_histogram_metrics(labels, 3, reference)
    assert result["classes_covered"] == 1
    # The reference's empty bins get eps / K, which keeps the KL finite; p's empty bin adds 0.
    eps = REFERENCE_SMOOTHING
    expected = 0.995 * math.log(0.995 / (1 - eps + eps / 3)) + 0.005 * math.log(0.005 / (eps / 3))
    assert result["class_kl"] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- toys


@pytest.mark.numerics
def test_toy_metrics_on_true_samples():
    ring = toy_metrics(make_toy("ring8").sample(PAPER_SAMPLE_COUNT, generator()), "ring8")
    assert ring["modes_covered"] == 8
    # The entropy of 8 well-separated N(., 0.01^2 I), ln 8 + ln(2 pi e 0.01^2), within 4 Monte-Carlo
    # standard errors (-ln p of a 2-D Gaussian sample is chi^2_2 / 2 + const: variance 1).
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 1e-4)
    assert ring["mean_neg_log_density"] == pytest.approx(entropy, abs=4 / math.sqrt(PAPER_SAMPLE_COUNT))
    moons = toy_metrics(make_toy("moons").sample(PAPER_SAMPLE_COUNT, generator()), "moons")
    assert "modes_covered" not in moons and moons["outside_support_fraction"] == 0.0


def test_toy_metrics_off_the_checkerboard():
    result = toy_metrics(torch.tensor([[-3.0, -3.0], [-1.0, -3.0]]), "checkerboard")  # black cell, white cell
    assert result["outside_support_fraction"] == 0.5
    assert result["mean_neg_log_density"] == math.inf


# ----------------------------------------------------------------------------- feature classifier

# 16x16 and 2 epochs keep the test fast; the default recipe at 32x32 reaches ~98%.
SMALL_DATA = DataConfig(resolution=16)
SMALL_RECIPE = ClassifierRecipe(epochs=2)
MIN_ACCURACY = 0.93  # chance is 0.10; this recipe measures ~0.97


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def trained(cache_dir):
    return get_feature_classifier(SMALL_DATA, cache_dir, "cpu", SMALL_RECIPE)


@pytest.fixture(scope="module")
def splits():
    return load_data(SMALL_DATA)


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return batch["x"], batch["label"]


@pytest.mark.numerics
def test_classifier_trains_to_a_real_accuracy(trained):
    _, info = trained
    assert info["trained_now"]
    assert info["validation_accuracy"] >= MIN_ACCURACY


def test_classifier_cache_reloads_without_training(trained, cache_dir, splits, monkeypatch):
    classifier, info = trained

    def no_training(*args):
        raise AssertionError("a cached classifier was trained again")

    monkeypatch.setattr(evaluation, "train_classifier", no_training)
    cached, cached_info = get_feature_classifier(SMALL_DATA, cache_dir, "cpu", SMALL_RECIPE)
    assert not cached_info["trained_now"]
    assert cached_info["validation_accuracy"] == info["validation_accuracy"]
    images, _ = stacked(splits.validation)
    assert torch.equal(image_outputs(cached, images)[0], image_outputs(classifier, images)[0])
    assert [p.name for p in cache_dir.iterdir()] == [f"feature-classifier-{info['cache_key']}"]  # no temp left
    # Another recipe or data config is another classifier.
    assert classifier_cache_key(SMALL_DATA, ClassifierRecipe(epochs=3)) != info["cache_key"]
    assert classifier_cache_key(DataConfig(resolution=32), SMALL_RECIPE) != info["cache_key"]


def test_losing_a_publication_race_keeps_the_winner(tmp_path):
    folder = tmp_path / "feature-classifier-0"
    evaluation._publish(ImageClassifier(), {"validation_accuracy": 0.5}, folder)
    evaluation._publish(ImageClassifier(), {"validation_accuracy": 0.7}, folder)  # a second process, later
    assert json.loads((folder / evaluation.CLASSIFIER_INFO).read_text()) == {"validation_accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_classifier_trains_inside_no_grad():
    labels = torch.arange(10).repeat(4)
    images = InMemoryDataset(torch.rand(40, 1, 16, 16, generator=generator()) * 2 - 1, labels)
    tiny = DataSplits(images, images, sample_shape=(1, 16, 16), kind="image", num_classes=10, description="tiny")
    with torch.no_grad():  # as in a stage's evaluate
        _, info = evaluation.train_classifier(tiny, ClassifierRecipe(epochs=1), "cpu")
    assert info["num_train"] == 40


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_classifier_features_at_any_resolution(tmp_path, resolution):
    classifier = ImageClassifier(in_channels=3, num_classes=7, feature_dim=12)
    images = torch.rand(2, 3, resolution, resolution, generator=generator()) * 2 - 1
    assert classifier.features(images).shape == (2, 12) and classifier(images).shape == (2, 7)
    classifier.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert torch.equal(ImageClassifier.from_pretrained(tmp_path).features(images), classifier.features(images))


def fd_by_hand(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID's formula in float64 numpy, as FID's reference code computes it: means, unbiased
    covariances S, and tr((S_a S_b)^(1/2)) as the sum of the square roots of the eigenvalues of the
    (non-symmetric) product S_a S_b, real and >= 0 up to round-off."""
    a, b = features_a.double().numpy(), features_b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt_product = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    return float(np.square(a.mean(0) - b.mean(0)).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product)


@pytest.mark.numerics
def test_train_validation_floor_is_far_below_noise(trained, splits):
    classifier, _ = trained
    train_images, train_labels = stacked(splits.train)
    validation_images, _ = stacked(splits.validation)
    noise = torch.rand(validation_images.shape, generator=generator()) * 2 - 1
    floor = train_test_floor(splits, classifier)
    real = image_metrics(validation_images, train_images, classifier, train_labels)
    fake = image_metrics(noise, train_images, classifier, train_labels)
    # The floor against FID's formula written out apart from modules/metrics, on the same features.
    # Both sides are float64 on float32 features; 28 of the 64 feature units are dead (exactly zero
    # rows and columns of both covariances), where a square root turns round-off of size delta into
    # sqrt(delta) ~ 1e-5. Measured: 1.5e-6 (default), 6.6e-6 (avx2), 4.4e-6 (avx512) relative;
    # covariances normalised by N instead of N - 1 move the floor by 1.1e-3, a wrong formula by O(1).
    expected = fd_by_hand(image_outputs(classifier, validation_images)[0], image_outputs(classifier, train_images)[0])
    assert floor == pytest.approx(expected, rel=1e-4)
    assert real["fd"] == pytest.approx(expected, rel=1e-4)
    assert fake["fd"] > 50 * floor
    assert real["classes_covered"] == 10 and real["class_kl"] < 0.02
    assert fake["class_kl"] > 10 * real["class_kl"]


class ClassifierFeatures(nn.Module):
    """The classifier as a torchmetrics feature extractor; `num_features` spares it a probe with a
    (3, 299, 299) dummy image."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


@pytest.mark.numerics
def test_fd_agrees_with_torchmetrics_fid_on_classifier_features(trained, splits):
    classifier, _ = trained
    train_images, train_labels = stacked(splits.train)
    validation_images, _ = stacked(splits.validation)
    # Custom extractors receive the images unchanged (normalize only rescales for the built-in Inception).
    reference = FrechetInceptionDistance(feature=ClassifierFeatures(classifier))
    reference.update(train_images, real=True)
    reference.update(validation_images, real=False)
    ours = image_metrics(validation_images, train_images, classifier, train_labels)["fd"]
    # Both start from float32 features, computed in different batches (other kernels, other rounding)
    # and returned in float32 by torchmetrics. FD is a small difference of large traces: relative
    # feature errors of eps32 move it by at most ~eps32 (tr S_a + tr S_b) / FD = 1.9e-4 here (traces
    # ~217 each, FD 0.27), typically far less as roundings cancel (3e-6 for random eps32 noise).
    # Measured: 1.5e-6 (default), 6.6e-6 (avx2), 4.4e-6 (avx512). A wrong formula is off by O(1).
    assert ours == pytest.approx(reference.compute().item(), rel=1e-4)
