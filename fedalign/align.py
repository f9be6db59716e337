"""Feature alignment math for FedKA (Sun, Chong, Ochiai, ACML 2022), Flower-free.

``mk_mmd`` is the multi-kernel MMD of the official notebook's ``MMD_loss`` (DAN-style, equal
kernel weights, biased estimate); ``alpha_schedule`` is the weight ramp of the alignment losses.
"""

from __future__ import annotations

import math

import torch


def _check_features(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` and ``y`` are non-empty 2-D batches of the same width."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"mk_mmd needs 2-D feature batches, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mk_mmd feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(
            f"mk_mmd needs at least one row in each batch, got {x.shape[0]} and {y.shape[0]}"
        )


def pairwise_sq_distances(z: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``z`` via the Gram matrix.

    The squared norms are read off the Gram diagonal, so the diagonal (and the distance between
    bitwise-identical rows) is exactly zero; rounding below zero is clamped away.

    Parameters
    ----------
    z : torch.Tensor
        Points, shape (N, d).

    Returns
    -------
    torch.Tensor
        Distances ``D[i, j] = ||z_i - z_j||^2``, shape (N, N), non-negative.
    """
    gram = z @ z.T
    sq_norms = gram.diagonal()
    return (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)


def mk_mmd(
    x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5
) -> torch.Tensor:
    """Multi-kernel MMD^2 between two feature batches (biased estimate, equal kernel weights).

    With ``Z = concat(x, y)``, ``D_ij = ||z_i - z_j||^2`` and ``N = m + n``, the base bandwidth
    is ``sum(D) / (N^2 - N)`` and the kernels use bandwidths
    ``base * kernel_mul**k / kernel_mul**(kernel_num // 2)`` for ``k = 0..kernel_num-1``
    (summed with equal weights). The bandwidth is a constant for gradients (detached).

    Parameters
    ----------
    x : torch.Tensor
        First batch (e.g. source features), shape (m, d), m >= 1.
    y : torch.Tensor
        Second batch (e.g. target embeddings), shape (n, d), n >= 1; m may differ from n.
    kernel_mul : float
        Ratio between consecutive bandwidths (> 0).
    kernel_num : int
        Number of Gaussian kernels (>= 1).

    Returns
    -------
    torch.Tensor
        Scalar ``mean(K_XX) + mean(K_YY) - mean(K_XY) - mean(K_YX)``; gradients flow to ``x`` and
        ``y``. Zero (still attached to the graph) when all points coincide.

    Raises
    ------
    ValueError
        If the batches are not 2-D, differ in width, are empty, or the kernel settings are invalid.
    """
    _check_features(x, y)
    if kernel_mul <= 0 or kernel_num < 1:
        raise ValueError(
            f"mk_mmd needs kernel_mul > 0 and kernel_num >= 1, got {kernel_mul}, {kernel_num}"
        )
    m, total = x.shape[0], x.shape[0] + y.shape[0]
    distances = pairwise_sq_distances(torch.cat([x, y], dim=0))
    base = distances.detach().sum() / (total * total - total)
    if base.item() == 0.0:
        return (x.sum() + y.sum()) * 0.0
    scales = kernel_mul ** torch.arange(kernel_num, dtype=distances.dtype, device=distances.device)
    bandwidths = base * scales / kernel_mul ** (kernel_num // 2)
    kernels = torch.exp(-distances[None] / bandwidths[:, None, None]).sum(dim=0)
    return (
        kernels[:m, :m].mean()
        + kernels[m:, m:].mean()
        - kernels[:m, m:].mean()
        - kernels[m:, :m].mean()
    )


def alpha_schedule(progress: float) -> float:
    """FedKA's alignment weight ramp ``2 / (1 + exp(-5 p)) - 1``.

    Parameters
    ----------
    progress : float
        Training progress p; clipped to [0, 1].

    Returns
    -------
    float
        0 at p = 0, rising monotonically to about 0.987 at p = 1.

    Raises
    ------
    ValueError
        If ``progress`` is NaN.
    """
    if math.isnan(progress):
        raise ValueError("alpha_schedule progress must be a number in [0, 1], got NaN")
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-5.0 * p)) - 1.0
