"""A site's data checked against the federation before it joins (``fedalign silo check``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedalign.data.types import DataError, DomainSplit


def check_split(
    split: DomainSplit, classes: Sequence[str] | None = None, min_train: int = 10
) -> DomainSplit:
    """``split`` (already loaded and validated) against the federation's class names, in order,
    and a minimum number of training samples; ``DataError`` with one line for the first fault."""
    where = f"silo '{split.name}'"
    if classes is not None and tuple(split.classes) != tuple(classes):
        missing = [c for c in classes if c not in split.classes]
        extra = [c for c in split.classes if c not in classes]
        detail = (
            f"missing {missing}, unexpected {extra}"
            if missing or extra
            else f"same names in another order: {list(split.classes)}"
        )
        raise DataError(
            f"{where}: its classes do not match the federation's {list(classes)} ({detail}); "
            "rename the class folders or labels to the federation's names"
        )
    if len(split.y_train) < min_train:
        raise DataError(
            f"{where}: only {len(split.y_train)} training samples (the federation needs at "
            f"least {min_train}); add data"
        )
    return split


def class_counts(split: DomainSplit) -> dict[str, tuple[int, int]]:
    """Class name -> (train count, test count)."""
    train = np.bincount(split.y_train, minlength=split.num_classes)
    test = np.bincount(split.y_test, minlength=split.num_classes)
    return {name: (int(train[i]), int(test[i])) for i, name in enumerate(split.classes)}
