"""Federated voting: K source models' predictions on N target samples -> pseudo-labels, Flower-free.

Hard votes are K x N integer labels (plurality); soft votes are K x N x C probabilities (argmax of
the summed probabilities). Ties always go to the lowest class index, independent of client order.
FedKA's paper setting is hard votes with ``min_agreement = 0``.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_EPS = 1e-9


def _to_numpy(array: ArrayLike) -> np.ndarray:
    """A numpy view of a numpy array or (detached, CPU) torch tensor."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_hard(choices: np.ndarray, num_classes: int | None) -> int:
    """Validate K x N integer labels; return the number of classes (inferred when None)."""
    if choices.ndim != 2 or choices.shape[0] < 1:
        raise ValueError(f"hard votes must be a K x N label array with K >= 1, got {choices.shape}")
    if not np.issubdtype(choices.dtype, np.integer):
        raise ValueError(f"hard votes must be integer class labels, got dtype {choices.dtype}")
    if num_classes is None:
        num_classes = int(choices.max()) + 1 if choices.size else 1
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if choices.size and (choices.min() < 0 or choices.max() >= num_classes):
        raise ValueError(
            f"hard votes must lie in [0, {num_classes}), got range "
            f"[{choices.min()}, {choices.max()}]"
        )
    return num_classes


def _check_soft(probs: np.ndarray, num_classes: int | None) -> None:
    """Validate K x N x C non-negative probabilities (C must match ``num_classes`` if given)."""
    if probs.ndim != 3 or probs.shape[0] < 1 or probs.shape[2] < 1:
        raise ValueError(
            f"soft votes must be a K x N x C probability array with K, C >= 1, got {probs.shape}"
        )
    if num_classes is not None and probs.shape[2] != num_classes:
        raise ValueError(f"soft votes have {probs.shape[2]} classes, expected {num_classes}")
    if not np.issubdtype(probs.dtype, np.floating) or not np.all(probs >= 0):
        raise ValueError("soft votes must be non-negative floating-point probabilities (no NaN)")


def _infer_soft(predictions: np.ndarray, soft: bool | None) -> bool:
    """``soft`` as given, else True for 3-D and False for 2-D predictions."""
    return predictions.ndim == 3 if soft is None else soft


def _client_choices(predictions: np.ndarray, soft: bool) -> np.ndarray:
    """Each client's own label per sample, K x N (argmax over classes for soft votes)."""
    return predictions.argmax(axis=2) if soft else predictions


def _plurality(choices: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Plurality winners (lowest class on ties) and their vote counts, both (N,)."""
    num_samples = choices.shape[1]
    flat = (choices.astype(np.int64) + num_classes * np.arange(num_samples)[None, :]).ravel()
    counts = np.bincount(flat, minlength=num_samples * num_classes)
    counts = counts.reshape(num_samples, num_classes)
    winners = counts.argmax(axis=1)
    return winners, counts[np.arange(num_samples), winners]


def _soft_winners(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax of summed probabilities (lowest class on ties) and its count of client argmaxes."""
    winners = probs.sum(axis=0).argmax(axis=1)
    votes = (_client_choices(probs, soft=True) == winners[None, :]).sum(axis=0)
    return winners, votes


def vote(
    predictions: ArrayLike,
    soft: bool = False,
    min_agreement: float = 0.0,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels by federated vote, with an optional agreement threshold.

    Parameters
    ----------
    predictions : numpy.ndarray or torch.Tensor
        Hard: K x N integer labels. Soft: K x N x C non-negative probabilities.
    soft : bool
        Soft vote (argmax of the summed probabilities) instead of hard plurality.
    min_agreement : float
        Threshold tau in [0, 1]: keep a sample when at least ``tau * K`` clients chose the winner
        (for soft votes: clients whose own argmax is the winner). 0 keeps everything.
    num_classes : int or None
        Number of classes; inferred from the labels (hard) or the last axis (soft) when None.

    Returns
    -------
    labels : numpy.ndarray
        Winners, shape (N,), int64; ties go to the lowest class index.
    mask : numpy.ndarray
        Shape (N,), bool: True where the winner reached the threshold.

    Raises
    ------
    ValueError
        On malformed shapes, out-of-range labels, negative probabilities or a bad threshold.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must lie in [0, 1], got {min_agreement}")
    array = _to_numpy(predictions)
    if soft:
        _check_soft(array, num_classes)
        winners, votes = _soft_winners(array)
    else:
        winners, votes = _plurality(array, _check_hard(array, num_classes))
    mask = votes >= min_agreement * array.shape[0] - _EPS
    return winners.astype(np.int64), mask.astype(bool)


def _check_per_sample(name: str, array: np.ndarray, num_samples: int) -> None:
    """Raise ValueError unless ``array`` has shape (num_samples,)."""
    if array.shape != (num_samples,):
        raise ValueError(f"{name} must have shape ({num_samples},), got {array.shape}")


def _mean(values: np.ndarray) -> float:
    """The mean as a float, 0.0 for an empty array."""
    return float(values.mean()) if values.size else 0.0


def vote_stats(
    predictions: ArrayLike,
    labels: ArrayLike,
    mask: ArrayLike,
    truth: ArrayLike | None = None,
    soft: bool | None = None,
) -> dict[str, float]:
    """Diagnostics of a vote: agreement, kept fraction and (optionally) pseudo-label accuracy.

    Parameters
    ----------
    predictions : numpy.ndarray or torch.Tensor
        The votes given to ``vote``: K x N labels (hard) or K x N x C probabilities (soft).
    labels : numpy.ndarray or torch.Tensor
        The winners, shape (N,).
    mask : numpy.ndarray or torch.Tensor
        The kept samples, shape (N,), bool.
    truth : numpy.ndarray or torch.Tensor or None
        True target labels, shape (N,), for the diagnostic accuracy; None when unknown.
    soft : bool or None
        Whether ``predictions`` are soft; inferred from their dimension (3-D = soft) when None.

    Returns
    -------
    dict[str, float]
        ``agreement`` (mean fraction of clients whose own choice is the winner),
        ``kept_fraction``, ``num_voters`` (K), ``num_samples`` (N), and
        ``pseudo_label_accuracy`` on the kept samples when ``truth`` is given and any are kept.
        Means over zero samples are reported as 0.0.

    Raises
    ------
    ValueError
        On malformed predictions or per-sample arrays whose length is not N.
    """
    array = _to_numpy(predictions)
    is_soft = _infer_soft(array, soft)
    if is_soft:
        _check_soft(array, None)
    else:
        _check_hard(array, None)
    winners, kept = _to_numpy(labels), _to_numpy(mask).astype(bool)
    num_voters, num_samples = array.shape[:2]
    _check_per_sample("labels", winners, num_samples)
    _check_per_sample("mask", kept, num_samples)
    agrees = _client_choices(array, is_soft) == winners[None, :]
    stats: dict[str, float] = {
        "agreement": _mean(agrees),
        "kept_fraction": _mean(kept),
        "num_voters": num_voters,
        "num_samples": num_samples,
    }
    if truth is not None:
        true_labels = _to_numpy(truth)
        _check_per_sample("truth", true_labels, num_samples)
        if kept.any():
            stats["pseudo_label_accuracy"] = _mean(winners[kept] == true_labels[kept])
    return stats
