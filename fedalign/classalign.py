"""Class-aware feature alignment for FedKA (Flower-free).

Marginal MK-MMD can pull a source's features of one class toward the target features of
another. Here the target silo summarises its embeddings per *pseudo-label* (the federated vote's
output) as class-conditional Gaussians with one shared diagonal covariance: C class means and D
pooled within-class variances. The sources then pull each feature toward the target's mean of its
own (true) class and away from the other classes' means, in Mahalanobis distance, with the loss
of CAFA (Jung et al., ICCV 2023): ``log(d(f, mu_y) / sum_c d(f, mu_c))``.

Only these (C + 1) x D numbers and a C-long mask of the classes that had enough votes leave the
target silo: no per-sample value, no label. With marginal alignment off they replace the M x D
per-sample embeddings altogether.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

VARIANCE_FLOOR = 1e-2  # added to each variance, relative to their mean: dead units stay finite


@dataclass(frozen=True)
class ClassStatistics:
    """Class-conditional Gaussians of the target embeddings under the vote's pseudo-labels.

    Attributes
    ----------
    means : np.ndarray
        (C, D) float32; rows of absent classes are zero.
    variance : np.ndarray
        (D,) float32 pooled within-class variance over the present classes.
    present : np.ndarray
        (C,) bool: the classes with at least ``min_count`` pseudo-labels.
    """

    means: np.ndarray
    variance: np.ndarray
    present: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that travel (the mask as float32 0/1)."""
        return {
            "means": self.means.astype(np.float32),
            "variance": self.variance.astype(np.float32),
            "present": self.present.astype(np.float32),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ClassStatistics:
        """Inverse of :meth:`to_arrays`; ValueError when the arrays do not fit together."""
        try:
            means, variance, present = arrays["means"], arrays["variance"], arrays["present"]
        except KeyError as exc:
            raise ValueError(f"class statistics lack the array {exc}") from exc
        if means.ndim != 2 or variance.shape != means.shape[1:] or present.shape != means.shape[:1]:
            raise ValueError(
                f"class statistics do not fit together: means {means.shape}, "
                f"variance {variance.shape}, present {present.shape}"
            )
        if not (np.isfinite(means).all() and np.isfinite(variance).all()) or (variance < 0).any():
            raise ValueError("class statistics hold a non-finite mean or a negative variance")
        return cls(
            means.astype(np.float32), variance.astype(np.float32), present.astype(bool).copy()
        )


def class_statistics(
    features: np.ndarray, labels: np.ndarray, num_classes: int, min_count: int = 8
) -> ClassStatistics | None:
    """Per-class means and the pooled within-class diagonal variance of ``features``.

    Parameters
    ----------
    features : np.ndarray
        (N, D) features of the voted target samples.
    labels : np.ndarray
        (N,) their pseudo-labels in ``[0, num_classes)``.
    num_classes : int
        C.
    min_count : int
        A class needs at least this many samples (>= 2) to be present.

    Returns
    -------
    ClassStatistics or None
        None when fewer than two classes are present: no class-aware loss can be formed.

    Raises
    ------
    ValueError
        On mismatched shapes, a label outside the classes, or ``min_count < 2``.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"class_statistics: features {features.shape}, labels {labels.shape}")
    if min_count < 2:
        raise ValueError(f"class_statistics needs min_count >= 2, got {min_count}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class_statistics: a label lies outside [0, {num_classes})")
    x = features.astype(np.float64)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts >= min_count
    if present.sum() < 2:
        return None
    means = np.zeros((num_classes, x.shape[1]))
    squares = np.zeros(x.shape[1])
    for c in np.flatnonzero(present):
        rows = x[labels == c]
        means[c] = rows.mean(axis=0)
        squares += ((rows - means[c]) ** 2).sum(axis=0)
    variance = squares / (counts[present].sum() - present.sum())
    return ClassStatistics(means.astype(np.float32), variance.astype(np.float32), present)


def class_alignment_loss(
    features: torch.Tensor, labels: torch.Tensor, stats: ClassStatistics
) -> torch.Tensor:
    """CAFA's class-aware loss against the target's class-conditional Gaussians.

    With ``d_c(f) = sum_d (f_d - mu_{c,d})^2 / (v_d + VARIANCE_FLOOR * mean(v))`` over the present
    classes c, the loss is the mean over the rows whose label is present of
    ``log(d_y(f) / sum_c d_c(f))``: small when a feature sits near its class's target mean and
    far from the others.

    Parameters
    ----------
    features : torch.Tensor
        (n, D) source features.
    labels : torch.Tensor
        (n,) their true labels.
    stats : ClassStatistics
        The target silo's statistics (D must match).

    Returns
    -------
    torch.Tensor
        A scalar attached to ``features``' graph; zero when no row's class is present.

    Raises
    ------
    ValueError
        If the feature width differs from the statistics'.
    """
    if features.dim() != 2 or features.shape[1] != stats.means.shape[1]:
        raise ValueError(
            f"class alignment: features {tuple(features.shape)} do not fit statistics of width "
            f"{stats.means.shape[1]}; check model= on all sides"
        )
    device, dtype = features.device, features.dtype
    classes = torch.from_numpy(np.flatnonzero(stats.present)).to(device)
    means = torch.from_numpy(stats.means).to(device=device, dtype=dtype)[classes]
    variance = torch.from_numpy(stats.variance).to(device=device, dtype=dtype)
    precision = 1.0 / (variance + VARIANCE_FLOOR * variance.mean())
    slot = torch.full((len(stats.present),), -1, dtype=torch.long, device=device)
    slot[classes] = torch.arange(len(classes), device=device)
    own = slot[labels]
    keep = own >= 0
    if not bool(keep.any()):
        return features.sum() * 0.0
    diffs = features[keep][:, None, :] - means[None]
    distances = (diffs.square() * precision).sum(dim=2)
    mine = distances.gather(1, own[keep][:, None]).squeeze(1)
    return (mine.log() - distances.sum(dim=1).log()).mean()
