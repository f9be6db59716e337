"""Test-time adaptation at the target silo (Flower-free): LAME and AdaBN.

Both adapt to unlabelled target inputs at test time and touch no training:

- LAME (Boudiaf, Mueller, Ben Ayed, Bertinetto, "Parameter-free Online Test-time Adaptation",
  CVPR 2022; official code github.com/fiveai/LAME) keeps the model and adjusts its predictions
  over a batch of inputs: assignments ``z`` minimise ``sum_i KL(z_i || p_i) - sum_ij w_ij
  z_i^T z_j`` with ``w`` an affinity of the inputs' L2-normalised features, by the bound
  optimisation ``z_i <- softmax(log p_i + sum_j w_ij z_j)`` (:func:`lame`).
- AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016)
  keeps the weights and re-estimates every BatchNorm layer's statistics on target inputs
  (:func:`adabn`), with the BatchNorm-only train mode the vote uses
  (``fedalign.workspace.with_batch_statistics``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.special import softmax
from torch import nn

from fedalign.settings.tta import AFFINITIES
from fedalign.train import to_input
from fedalign.workspace import with_batch_statistics

EPSILON = 1e-10  # added to p before its log (the official code's)
TOLERANCE = 1e-8  # relative change of the energy at which the updates stop (the official code's)


def knn_affinity(features: np.ndarray, knn: int) -> np.ndarray:
    """``w_ij = 1`` when j is one of the ``knn`` nearest neighbours of i (Euclidean, i itself
    excluded), else 0; not symmetric. With fewer than ``knn + 1`` points every other point is
    a neighbour.

    Parameters
    ----------
    features : np.ndarray
        (N, D) features.
    knn : int
        Neighbours per point.
    """
    n = len(features)
    distances = cdist(features, features)
    np.fill_diagonal(distances, np.inf)
    k = min(knn, n - 1)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    affinity = np.zeros((n, n))
    np.put_along_axis(affinity, nearest, 1.0, axis=1)
    return affinity


def rbf_affinity(features: np.ndarray, knn: int) -> np.ndarray:
    """``w_ij = exp(-d_ij^2 / (2 sigma^2))`` with sigma the mean over i of the ``knn``-th
    smallest distance from i (i itself counted, as the official code does).

    Parameters
    ----------
    features : np.ndarray
        (N, D) features.
    knn : int
        Which smallest distance sets the bandwidth.
    """
    distances = cdist(features, features)
    k = min(knn, len(features))
    sigma = np.sort(distances, axis=1)[:, k - 1].mean()
    return np.exp(-(distances**2) / (2 * sigma**2))


def affinity_matrix(features: np.ndarray, kind: str, knn: int) -> np.ndarray:
    """The LAME affinity of ``kind`` (``knn`` or ``rbf``) over L2-normalised ``features``.

    Parameters
    ----------
    features : np.ndarray
        (N, D) features, normalised here.
    kind : {"knn", "rbf"}
    knn : int
        Neighbours (``knn``) or the bandwidth's neighbour rank (``rbf``).
    """
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    if kind == "knn":
        return knn_affinity(unit, knn)
    if kind == "rbf":
        return rbf_affinity(unit, knn)
    raise ValueError(f"unknown LAME affinity {kind!r} (known: {', '.join(AFFINITIES)})")


def lame(probabilities: np.ndarray, affinity: np.ndarray, max_steps: int = 100) -> np.ndarray:
    """LAME's assignments of a batch: ``z <- softmax(log p + W z)`` from ``z = p``.

    Stops after ``max_steps`` updates, or earlier from the third update on when the energy
    ``sum_i z_i^T (log z_i - log p_i - (W z_prev)_i)`` changed by at most ``1e-8`` of its
    previous value (the official code's rule).

    Parameters
    ----------
    probabilities : np.ndarray
        (N, K) the model's class probabilities.
    affinity : np.ndarray
        (N, N) ``W`` (:func:`affinity_matrix`).
    max_steps : int (default: 100)
        Most updates.

    Returns
    -------
    np.ndarray
        (N, K) adjusted class probabilities; their argmax is LAME's prediction.
    """
    log_p = np.log(probabilities + EPSILON)
    z = softmax(log_p, axis=1)
    previous = math.inf
    for step in range(max_steps):
        pairwise = affinity @ z
        z = softmax(log_p + pairwise, axis=1)
        energy = float(np.sum(z * (np.log(np.clip(z, 1e-20, None)) - log_p - pairwise)))
        if step > 1 and abs(energy - previous) <= TOLERANCE * abs(previous):
            break
        previous = energy
    return z


def even_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Indices ``0..n-1`` in order, cut into ``ceil(n / batch_size)`` batches whose sizes
    differ by at most one (no batch of one when ``n >= 2``)."""
    return np.array_split(np.arange(n), max(1, math.ceil(n / batch_size)))


@torch.no_grad()
def lame_predict(
    model: nn.Module,
    x: np.ndarray,
    device: torch.device,
    affinity: str = "knn",
    knn: int = 5,
    max_steps: int = 100,
    batch_size: int = 16,
) -> np.ndarray:
    """LAME's labels for ``x``, adapted batch by batch in order (eval-mode model).

    Parameters
    ----------
    model : nn.Module
        A ``SplitModel`` (``features`` and ``classify``); not modified.
    x : np.ndarray
        Target inputs.
    device : torch.device
    affinity : {"knn", "rbf"} (default: "knn")
    knn : int (default: 5)
    max_steps : int (default: 100)
    batch_size : int (default: 16)
        Inputs adapted together (:func:`even_batches`).
    """
    model.to(device).eval()
    labels = []
    for idx in even_batches(len(x), batch_size):
        features = model.features(to_input(x[idx], device))
        probabilities = model.classify(features).softmax(1).double().cpu().numpy()
        w = affinity_matrix(features.double().cpu().numpy(), affinity, knn)
        labels.append(lame(probabilities, w, max_steps).argmax(1))
    return np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers, in order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adabn(
    model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 512
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``x``, in eval mode.

    Each layer's running mean and variance become the average over the batches of ``x``
    (:func:`even_batches`, in order) of the batch's mean and unbiased variance of that layer's
    input (torch's cumulative average, ``momentum=None``); every other layer stays in eval mode
    (no dropout). On one batch they are that batch's statistics.

    Parameters
    ----------
    model : nn.Module
        The model; not modified.
    x : np.ndarray
        Unlabelled target inputs, at least 2.
    device : torch.device
    batch_size : int (default: 512)
    """
    if len(x) < 2:
        raise ValueError(f"AdaBN needs at least 2 target inputs, got {len(x)}")
    adapted = with_batch_statistics(model).to(device)
    layers = batchnorms(adapted)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    for idx in even_batches(len(x), batch_size):
        adapted(to_input(x[idx], device))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return adapted.eval()
