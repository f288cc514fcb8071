"""Closed-form Gaussian KL (course, part II) against torch.distributions and Monte Carlo."""

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from stagediff.modules.divergences import kl_normal_diag, kl_normal_full, kl_std_normal

pytestmark = pytest.mark.numerics  # every test here checks float results against tolerances

DTYPE = torch.float64
N_MONTE_CARLO = 200_000


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


def _random_spd(*batch: int, k: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """(*batch, k, k) well-conditioned SPD matrices: A A^T / k plus a ridge keeps eigenvalues >= scale / 2."""
    a = _randn(*batch, k, k, generator=generator)
    return scale * (a @ a.mT / k + 0.5 * torch.eye(k, dtype=DTYPE))


def _diag_normal(mean: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mean, (0.5 * logvar).exp()), 1)


def _assert_matches_monte_carlo(
    kl: torch.Tensor,
    log_ratio: torch.Tensor,
    trace_term: torch.Tensor,
    mahalanobis_term: torch.Tensor,
    log_det_ratio: torch.Tensor,
    k: int,
) -> None:
    """kl agrees with the sample mean of ln p0/p1 within 5 standard errors, a band too tight for
    any formula that drops or mangles one of the seed's terms (each such variant is checked)."""
    mc_estimate = log_ratio.mean()
    tolerance = 5 * log_ratio.std() / len(log_ratio) ** 0.5
    # The reference terms (computed independently by the caller) do assemble into kl ...
    torch.testing.assert_close(kl, 0.5 * (trace_term + mahalanobis_term - k + log_det_ratio))
    assert abs(kl - mc_estimate) < tolerance
    # ... and the Monte Carlo band is narrow enough to catch each plausible mistake.
    wrong_variants = {
        "without trace term": kl - 0.5 * trace_term,
        "without Mahalanobis term": kl - 0.5 * mahalanobis_term,
        "without -k": kl + 0.5 * k,
        "without log-det term": kl - 0.5 * log_det_ratio,
        "with |S0|/|S1| instead of |S1|/|S0|": kl - log_det_ratio,
    }
    for name, wrong_kl in wrong_variants.items():
        assert abs(wrong_kl - mc_estimate) > 10 * tolerance, name


def test_full_matches_torch_distributions(gen):
    batch, k = (4, 3), 5
    mean0, mean1 = _randn(*batch, k, generator=gen), _randn(*batch, k, generator=gen)
    cov0, cov1 = _random_spd(*batch, k=k, generator=gen), _random_spd(*batch, k=k, generator=gen)

    expected = kl_divergence(MultivariateNormal(mean0, cov0), MultivariateNormal(mean1, cov1))
    torch.testing.assert_close(kl_normal_full(mean0, cov0, mean1, cov1), expected)


def test_diag_matches_torch_distributions(gen):
    batch, k = (4, 3), 5
    mean0, mean1, logvar0, logvar1 = (_randn(*batch, k, generator=gen) for _ in range(4))

    expected = kl_divergence(_diag_normal(mean0, logvar0), _diag_normal(mean1, logvar1))
    torch.testing.assert_close(kl_normal_diag(mean0, logvar0, mean1, logvar1), expected)


def test_full_matches_monte_carlo(gen):
    k = 3
    mean0, mean1 = _randn(k, generator=gen), _randn(k, generator=gen)
    # Unequal covariance scales make ln(|S1|/|S0|) large (about 4.6), so dropping it would show.
    cov0 = _random_spd(k=k, generator=gen, scale=0.5)
    cov1 = _random_spd(k=k, generator=gen, scale=2.0)
    samples = mean0 + _randn(N_MONTE_CARLO, k, generator=gen) @ torch.linalg.cholesky(cov0).mT  # (N, k)
    log_ratio = MultivariateNormal(mean0, cov0).log_prob(samples) - MultivariateNormal(mean1, cov1).log_prob(samples)

    cov1_inv = torch.linalg.inv(cov1)
    mean_diff = mean1 - mean0
    _assert_matches_monte_carlo(
        kl_normal_full(mean0, cov0, mean1, cov1),
        log_ratio,
        trace_term=torch.trace(cov1_inv @ cov0),
        mahalanobis_term=mean_diff @ cov1_inv @ mean_diff,
        log_det_ratio=torch.logdet(cov1) - torch.logdet(cov0),
        k=k,
    )


def test_diag_matches_monte_carlo(gen):
    k = 4
    mean0, mean1 = _randn(k, generator=gen), _randn(k, generator=gen)
    logvar0 = _randn(k, generator=gen) - 1.0
    logvar1 = _randn(k, generator=gen) + 0.5
    samples = mean0 + (0.5 * logvar0).exp() * _randn(N_MONTE_CARLO, k, generator=gen)  # (N, k)
    log_ratio = _diag_normal(mean0, logvar0).log_prob(samples) - _diag_normal(mean1, logvar1).log_prob(samples)

    _assert_matches_monte_carlo(
        kl_normal_diag(mean0, logvar0, mean1, logvar1),
        log_ratio,
        trace_term=(logvar0 - logvar1).exp().sum(),
        mahalanobis_term=((mean1 - mean0).pow(2) / logvar1.exp()).sum(),
        log_det_ratio=(logvar1 - logvar0).sum(),
        k=k,
    )


def test_kl_of_a_distribution_with_itself_is_zero(gen):
    batch, k = (6,), 4
    mean, logvar = _randn(*batch, k, generator=gen), _randn(*batch, k, generator=gen)
    cov = _random_spd(*batch, k=k, generator=gen)
    zeros = torch.zeros(batch, dtype=DTYPE)

    torch.testing.assert_close(kl_normal_full(mean, cov, mean, cov), zeros)
    torch.testing.assert_close(kl_normal_diag(mean, logvar, mean, logvar), zeros)
    torch.testing.assert_close(kl_std_normal(torch.zeros(6, 4, dtype=DTYPE), torch.zeros(6, 4, dtype=DTYPE)), zeros)


def test_kl_is_non_negative(gen):
    batch, k = (1000,), 3
    mean0, mean1, logvar0, logvar1 = (_randn(*batch, k, generator=gen) for _ in range(4))
    cov0, cov1 = _random_spd(*batch, k=k, generator=gen), _random_spd(*batch, k=k, generator=gen)

    assert (kl_normal_full(mean0, cov0, mean1, cov1) >= 0).all()
    assert (kl_normal_diag(mean0, logvar0, mean1, logvar1) >= 0).all()
    assert (kl_std_normal(mean0, logvar0) >= 0).all()


def test_std_normal_kl_is_the_diag_and_full_kl_against_standard_normal(gen):
    mean, logvar = _randn(5, 2, 3, 3, generator=gen), _randn(5, 2, 3, 3, generator=gen)  # (B, C, h, w)
    flat_mean, flat_logvar = mean.flatten(1), logvar.flatten(1)  # (B, k)
    zeros = torch.zeros_like(flat_mean)
    identity = torch.eye(flat_mean.shape[1], dtype=DTYPE)

    kl = kl_std_normal(mean, logvar)
    assert kl.shape == (5,)
    torch.testing.assert_close(kl, kl_normal_diag(flat_mean, flat_logvar, zeros, zeros))
    torch.testing.assert_close(kl, kl_normal_full(flat_mean, torch.diag_embed(flat_logvar.exp()), zeros, identity))


def test_std_normal_kl_sums_over_given_dims(gen):
    mean, logvar = _randn(5, 2, 3, 4, generator=gen), _randn(5, 2, 3, 4, generator=gen)  # (B, C, h, w)

    per_channel = kl_std_normal(mean, logvar, dims=(2, 3))
    assert per_channel.shape == (5, 2)
    torch.testing.assert_close(per_channel.sum(1), kl_std_normal(mean, logvar))
    assert kl_std_normal(mean, logvar, dims=()).shape == (5, 2, 3, 4)


def test_full_kl_broadcasts_batch_dims(gen):
    k = 3
    mean0, cov0 = _randn(5, 1, k, generator=gen), _random_spd(5, 1, k=k, generator=gen)
    mean1, cov1 = _randn(4, k, generator=gen), _random_spd(k=k, generator=gen)  # one cov1 shared by all

    kl = kl_normal_full(mean0, cov0, mean1, cov1)
    assert kl.shape == (5, 4)
    for i in range(5):
        for j in range(4):
            torch.testing.assert_close(kl[i, j], kl_normal_full(mean0[i, 0], cov0[i, 0], mean1[j], cov1))


def test_diag_kl_broadcasts_batch_dims(gen):
    k = 3
    mean0, logvar0 = _randn(5, 1, k, generator=gen), _randn(5, 1, k, generator=gen)
    mean1, logvar1 = _randn(4, k, generator=gen), _randn(k, generator=gen)

    kl = kl_normal_diag(mean0, logvar0, mean1, logvar1)
    assert kl.shape == (5, 4)
    for i in range(5):
        for j in range(4):
            torch.testing.assert_close(kl[i, j], kl_normal_diag(mean0[i, 0], logvar0[i, 0], mean1[j], logvar1))
