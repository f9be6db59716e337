"""A PNG contact sheet of image domains (the Digits-5 builders' output, a site's own data)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedalign import atomic
from fedalign.data.cache import load_domain
from fedalign.data.digits5 import DIGITS5_DOMAINS
from fedalign.data.types import DomainSplit

_GAP = 2  # pixels between tiles


def _mosaic(images: np.ndarray, labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Tile the first ``per_class`` images of each class: one column per class, (H, W, 3)."""
    _, _, h, w = images.shape
    sheet = np.full(
        (per_class * (h + _GAP) - _GAP, num_classes * (w + _GAP) - _GAP, 3), 255, np.uint8
    )
    for c in range(num_classes):
        for row, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            y, x = row * (h + _GAP), c * (w + _GAP)
            sheet[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return sheet


def write_montage(
    out_png: Path,
    cache_dir: Path | str | None = None,
    seed: int = 0,
    per_class: int = 2,
    domains: Sequence[str] = DIGITS5_DOMAINS,
) -> Path:
    """Write a PNG with one labelled row block per domain showing test samples of each class.

    Domains are loaded (and built if needed) from the cache. Returns ``out_png``.
    """
    splits = [load_domain(name, cache_dir, seed) for name in domains]
    title = f"Digits-5 (seed {seed}): test samples per class"
    return write_split_montage(out_png, splits, title, per_class)


def write_split_montage(
    out_png: Path, splits: Sequence[DomainSplit], title: str, per_class: int = 2
) -> Path:
    """One labelled row block per image domain in ``splits`` (test samples of each class)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    fig = Figure(figsize=(7, 0.75 * per_class * len(splits) + 0.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    for ax, split in zip(axes, splits, strict=True):
        sheet = _mosaic(split.x_test, split.y_test, per_class, split.num_classes)
        ax.imshow(sheet, interpolation="nearest")
        width = split.input_shape[2] + _GAP
        ax.set_xticks(
            np.arange(split.num_classes) * width + (width - _GAP) / 2,
            labels=split.classes,
            fontsize=7,
        )
        ax.set_yticks([])
        ax.tick_params(length=0)
        ax.set_ylabel(split.name, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic.write_bytes(out_png, buffer.getvalue())
    return out_png
