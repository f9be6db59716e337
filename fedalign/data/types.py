"""Data containers shared by every data source: one domain's train/test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedalign.errors import FedalignError


class DataError(FedalignError, ValueError):
    """A data problem, described in one line that says what is wrong and what to do."""


@dataclass(frozen=True)
class DomainSplit:
    """One domain's inputs and labels (N,) int64, split into train/test. Inputs are images,
    uint8 (N, C, H, W), or feature vectors, float32 (N, D) (e.g. DeCAF features, bags of words).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes; labels lie in ``range(num_classes)``."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: (C, H, W) for an image, (D,) for a feature vector."""
        return tuple(int(n) for n in self.x_train.shape[1:])

    @property
    def is_features(self) -> bool:
        return self.x_train.ndim == 2

    def shard(self, index: int, shards: int, seed: int = 0) -> DomainSplit:
        """Part ``index`` of ``shards`` disjoint, equal-sized (up to one) random parts of the
        training data; the test split is kept whole. DataError when a part would be empty."""
        if not 0 <= index < shards:
            raise DataError(f"domain '{self.name}': shard {index} is outside [0, {shards})")
        if shards > len(self.y_train):
            raise DataError(
                f"domain '{self.name}' has {len(self.y_train)} training samples, too few for "
                f"{shards} shards; lower data.shards"
            )
        order = np.random.default_rng(seed).permutation(len(self.y_train))
        part = np.sort(order[index::shards])
        return DomainSplit(
            name=f"{self.name}.{index}",
            x_train=self.x_train[part],
            y_train=self.y_train[part],
            x_test=self.x_test,
            y_test=self.y_test,
            classes=self.classes,
        )

    def validate(
        self, fix: str = "rebuild the data with `fedalign data build --force`"
    ) -> DomainSplit:
        """Check dtypes, shapes, lengths and label range; raise ``DataError`` on the first fault,
        ending with ``fix`` (what to do).

        Returns ``self`` so that a loader can ``return split.validate()``.
        """
        where = f"domain '{self.name}'"
        if not self.classes:
            raise DataError(f"{where} has no classes; pass the class names to DomainSplit")
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            image, features = (
                x.dtype == np.uint8 and x.ndim == 4,
                x.dtype == np.float32 and x.ndim == 2,
            )
            if not (image or features):
                raise DataError(
                    f"{where}: x_{part} is {x.dtype} with {x.ndim} dims, expected uint8 images "
                    f"(N, C, H, W) or float32 features (N, D); {fix}"
                )
            if features and not np.isfinite(x).all():
                raise DataError(f"{where}: x_{part} has NaN or infinite features; {fix}")
            if y.dtype != np.int64 or y.ndim != 1:
                raise DataError(
                    f"{where}: y_{part} is {y.dtype} with {y.ndim} dims, expected int64 (N,); {fix}"
                )
            if len(x) != len(y):
                raise DataError(
                    f"{where}: x_{part} has {len(x)} images but y_{part} has {len(y)} labels; {fix}"
                )
            if len(y) == 0:
                raise DataError(f"{where}: the {part} split is empty; {fix}")
            if y.min() < 0 or y.max() >= self.num_classes:
                raise DataError(
                    f"{where}: y_{part} has labels in [{y.min()}, {y.max()}] "
                    f"outside [0, {self.num_classes - 1}]; {fix}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{where}: train images are {self.x_train.shape[1:]} but test images "
                f"are {self.x_test.shape[1:]}; rebuild the data so both match"
            )
        return self
