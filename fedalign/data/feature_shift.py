"""A feature-shift task built from package-shipped data, for feature/tabular silos (model=mlp).

scikit-learn's 1,797 8x8 digits become 64-d feature vectors (intensities / 16, in [0, 1]), split
into three disjoint, class-stratified thirds, each seen through a different "sensor":

- ``clean``: the intensities as they are;
- ``inverted``: 1 - x (a sensor with the opposite polarity);
- ``noisy``: 0.6 x + 0.2 + Gaussian noise (sigma 0.15, seeded): lower contrast, an offset, noise.

Same classes and feature space, shifted feature distributions: the covariate shift FedKA's
alignment targets, without images. Written as one ``.npz`` per silo folder (x, y, domain, classes)
and one file with every domain for a machine that hosts several silos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURE_SHIFT_DOMAINS = ("clean", "inverted", "noisy")


def build_feature_shift(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Domain -> (x float32 (N, 64), y int64 (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all, y_all = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    part = np.empty(len(y_all), dtype=np.int64)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(y_all == label))
        part[idx] = np.arange(len(idx)) % len(FEATURE_SHIFT_DOMAINS)
    out = {}
    for k, name in enumerate(FEATURE_SHIFT_DOMAINS):
        x, y = x_all[part == k], y_all[part == k]
        if name == "inverted":
            x = 1.0 - x
        elif name == "noisy":
            x = 0.6 * x + 0.2 + rng.normal(0.0, 0.15, size=x.shape).astype(np.float32)
        out[name] = (x.astype(np.float32), y)
    return out


def write_feature_shift(out: Path, seed: int = 0) -> dict[str, Path]:
    """``out/<domain>/<domain>.npz`` per silo and ``out/all/feature-shift.npz``; their paths."""
    classes = np.array([str(i) for i in range(10)])
    domains = build_feature_shift(seed)
    paths = {}
    for name, (x, y) in domains.items():
        paths[name] = Path(out) / name / f"{name}.npz"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        np.savez(paths[name], x=x, y=y, domain=np.full(len(y), name), classes=classes)
    paths["all"] = Path(out) / "all" / "feature-shift.npz"
    paths["all"].parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        paths["all"],
        x=np.concatenate([x for x, _ in domains.values()]),
        y=np.concatenate([y for _, y in domains.values()]),
        domain=np.concatenate([np.full(len(y), name) for name, (_, y) in domains.items()]),
        classes=classes,
    )
    return paths
