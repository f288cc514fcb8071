"""Closed-form Kullback-Leibler divergences between Gaussians.

Course, part II ("Notion de divergence"), for N0 = N(m0, S0) and N1 = N(m1, S1) in R^k:

    KL(N0 || N1) = 1/2 { tr(S1^-1 S0) + (m1 - m0)^T S1^-1 (m1 - m0) - k + ln(|S1| / |S0|) }

Every function is batched over leading dimensions, which broadcast like ordinary torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def kl_normal_full(mean0: Tensor, cov0: Tensor, mean1: Tensor, cov1: Tensor) -> Tensor:
    """KL(N(mean0, cov0) || N(mean1, cov1)) for full covariances (course, part II).

    Args:
        mean0, mean1: (..., k) means.
        cov0, cov1: (..., k, k) symmetric positive-definite covariances.

    Returns:
        (...) the KL for each element of the broadcast batch shape.

    S1^-1 only ever acts through triangular solves with the Cholesky factor L1 (S1 = L1 L1^T),
    and the log-determinants come from the factors' diagonals: no explicit inverse or det,
    which would lose accuracy (or overflow) for ill-conditioned or high-dimensional covariances.
    """
    chol0 = torch.linalg.cholesky(cov0)  # (..., k, k)
    chol1 = torch.linalg.cholesky(cov1)  # (..., k, k)
    # tr(S1^-1 S0) = ||L1^-1 L0||_F^2, because S1^-1 S0 = L1^-T (L1^-1 L0)(L1^-1 L0)^T L1^T.
    whitened_chol0 = torch.linalg.solve_triangular(chol1, chol0, upper=False)  # (..., k, k)
    trace_term = whitened_chol0.pow(2).sum(dim=(-2, -1))
    # (m1 - m0)^T S1^-1 (m1 - m0) = ||L1^-1 (m1 - m0)||^2.
    mean_diff = (mean1 - mean0).unsqueeze(-1)  # (..., k, 1)
    whitened_diff = torch.linalg.solve_triangular(chol1, mean_diff, upper=False)  # (..., k, 1)
    mahalanobis_term = whitened_diff.pow(2).sum(dim=(-2, -1))
    log_det_ratio = _log_det_from_cholesky(chol1) - _log_det_from_cholesky(chol0)  # ln(|S1| / |S0|)
    k = mean0.shape[-1]
    return 0.5 * (trace_term + mahalanobis_term - k + log_det_ratio)


def kl_normal_diag(mean0: Tensor, logvar0: Tensor, mean1: Tensor, logvar1: Tensor) -> Tensor:
    """KL(N(mean0, diag(exp(logvar0))) || N(mean1, diag(exp(logvar1)))), summed over the last dim.

    The course's closed form (part II) with diagonal covariances, where each term is a sum of
    per-coordinate terms: tr(S1^-1 S0) = sum var0 / var1, the Mahalanobis term is
    sum (m1 - m0)^2 / var1 and ln(|S1| / |S0|) = sum (logvar1 - logvar0).

    Args:
        mean0, logvar0, mean1, logvar1: (..., k) means and log-variances.

    Returns:
        (...) the KL for each element of the broadcast batch shape.
    """
    # exp(logvar0 - logvar1) rather than var0 / var1: stays finite where either variance would not.
    per_coordinate = (
        (logvar0 - logvar1).exp()
        + (mean1 - mean0).pow(2) * (-logvar1).exp()
        - 1
        + (logvar1 - logvar0)
    )  # (..., k)
    return 0.5 * per_coordinate.sum(dim=-1)


def kl_std_normal(mean: Tensor, logvar: Tensor, dims: Sequence[int] | None = None) -> Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)), the VAE regulariser.

    The course's closed form (part II) with m1 = 0, S1 = I:
    1/2 sum(mean^2 + exp(logvar) - 1 - logvar).

    Args:
        mean, logvar: posterior parameters, e.g. (B, C, h, w).
        dims: dimensions summed over; default all but the batch dim 0.

    Returns:
        The KL with `dims` reduced: (B,) by default.
    """
    per_element = mean.pow(2) + logvar.exp() - 1 - logvar
    if dims is None:
        dims = tuple(range(1, per_element.dim()))
    # torch reads an empty dim tuple as "reduce everything"; here it means "reduce nothing".
    if len(dims) == 0:
        return 0.5 * per_element
    return 0.5 * per_element.sum(dim=tuple(dims))


def _log_det_from_cholesky(chol: Tensor) -> Tensor:
    """ln|S| = 2 sum ln diag(L) for S = L L^T; (..., k, k) -> (...)."""
    return 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
