"""Published digit data a site already has on disk, behind the one loader interface.

- ``DigitFiveSource``: the Digit-Five ``.mat`` bundle that the FedKA and KD3A code use, one folder
  holding ``mnist_data.mat`` (``train_32``/``test_32``, one-hot ``label_train``/``label_test``),
  ``mnistm_with_label.mat`` (``train``/``test`` N x 28 x 28 x 3, one-hot labels),
  ``syn_number.mat`` (``train_data``/``test_data``, ``train_label``/``test_label``),
  ``svhn_train_32x32.mat`` + ``svhn_test_32x32.mat`` (``X`` 32 x 32 x 3 x N, ``y`` with 10 for 0)
  and ``usps_28x28.mat`` (``dataset``: [[train images, labels], [test images, labels]], images
  N x 1 x 28 x 28 in [0, 1]).
- ``TorchvisionSource``: torchvision's own datasets in their on-disk layout (``root/MNIST/raw``,
  ...), loaded with ``download=False``: nothing is ever fetched.

Every domain becomes uint8 (N, 3, 28, 28), labels 0-9, like the offline benchmark, so the same
models serve both. The layouts above are the published ones; our tests build files in them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedalign.data.digits5 import DIGIT_CLASSES
from fedalign.data.types import DataError, DomainSplit

DIGIT_FIVE_FILES = {
    "mnist": ("mnist_data.mat",),
    "mnistm": ("mnistm_with_label.mat",),
    "syn": ("syn_number.mat",),
    "svhn": ("svhn_train_32x32.mat", "svhn_test_32x32.mat"),
    "usps": ("usps_28x28.mat",),
}
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}


def to_digit_images(images: np.ndarray, layout: str) -> np.ndarray:
    """Images in ``layout`` (``NHW``, ``NHWC``, ``NCHW``, ``HWCN``), uint8 or [0, 1] floats ->
    uint8 (N, 3, 28, 28) (grey repeated to three channels, resized with antialiasing)."""
    import torch
    from torch.nn import functional

    x = np.asarray(images)
    if layout == "NHW":
        x = x[:, None]
    elif layout in ("NHWC", "HWCN"):
        x = x.transpose((0, 3, 1, 2) if layout == "NHWC" else (3, 2, 0, 1))
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        x = np.clip(x * 255.0 if x.max() <= 1.0 else x, 0, 255)
    tensor = torch.from_numpy(np.ascontiguousarray(x)).float()
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    if tuple(tensor.shape[2:]) != (28, 28):
        tensor = functional.interpolate(tensor, size=(28, 28), mode="bilinear", antialias=True)
    return tensor.round().clamp(0, 255).to(torch.uint8).numpy()


def to_labels(labels: np.ndarray) -> np.ndarray:
    """One-hot (N, 10) or (N,)/(N, 1) labels -> int64 (N,), SVHN's 10 read as 0."""
    y = np.asarray(labels)
    y = y.argmax(axis=1) if y.ndim == 2 and y.shape[1] == 10 else y.reshape(-1)
    y = y.astype(np.int64)
    y[y == 10] = 0
    return y


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"digit_five: {path} is missing; put the Digit-Five .mat files there")
    try:
        return loadmat(path)
    except (OSError, ValueError, NotImplementedError) as exc:
        raise DataError(f"digit_five: {path} is unreadable ({type(exc).__name__})") from None


class DigitFiveSource:
    """The real Digit-Five bundle in one folder (see the module docstring)."""

    name = "digit_five"

    def __init__(self, cache_dir: Path | str | None = None, seed: int = 0) -> None:
        if cache_dir is None:
            raise DataError("digit_five: no folder; set data.cache_dir (or data-dir) to it")
        self.root = Path(cache_dir)
        self.seed = seed

    def domains(self) -> tuple[str, ...]:
        return tuple(DIGIT_FIVE_FILES)

    def _arrays(self, domain: str) -> tuple[np.ndarray, ...]:
        files = [self.root / name for name in DIGIT_FIVE_FILES[domain]]
        mat = _loadmat(files[0])
        try:
            if domain == "mnist":
                return mat["train_32"], mat["label_train"], mat["test_32"], mat["label_test"], "NHW"
            if domain == "mnistm":
                return mat["train"], mat["label_train"], mat["test"], mat["label_test"], "NHWC"
            if domain == "syn":
                return (mat["train_data"], mat["train_label"], mat["test_data"],
                        mat["test_label"], "NHWC")  # fmt: skip
            if domain == "svhn":
                test = _loadmat(files[1])
                return mat["X"], mat["y"], test["X"], test["y"], "HWCN"
            (train_x, train_y), (test_x, test_y) = mat["dataset"][0][:2], mat["dataset"][1][:2]
            return train_x, train_y, test_x, test_y, "NCHW"
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(
                f"digit_five: {files[0]} lacks the Digit-Five layout ({exc}); see "
                "fedalign/data/published.py for the expected arrays"
            ) from None

    def load(self, domain: str) -> DomainSplit:
        if domain not in DIGIT_FIVE_FILES:
            known = ", ".join(DIGIT_FIVE_FILES)
            raise DataError(f"digit_five: unknown domain '{domain}' (known: {known})")
        x_train, y_train, x_test, y_test, layout = self._arrays(domain)
        split = DomainSplit(
            domain,
            to_digit_images(x_train, layout),
            to_labels(y_train),
            to_digit_images(x_test, layout),
            to_labels(y_test),
            DIGIT_CLASSES,
        )
        return split.validate(fix=f"check the Digit-Five files in {self.root}")


class TorchvisionSource:
    """torchvision datasets already on disk under one root (``download=False``)."""

    name = "torchvision"

    def __init__(self, cache_dir: Path | str | None = None, seed: int = 0) -> None:
        if cache_dir is None:
            raise DataError("torchvision: no root folder; set data.cache_dir (or data-dir)")
        self.root = Path(cache_dir)
        self.seed = seed

    def domains(self) -> tuple[str, ...]:
        return tuple(TORCHVISION_DATASETS)

    def load(self, domain: str) -> DomainSplit:
        try:
            import torchvision.datasets as datasets
        except ImportError as err:
            raise DataError(
                "the torchvision data source needs torchvision, which is not installed here: "
                "pip install 'fedalign[vision]'"
            ) from err

        if domain not in TORCHVISION_DATASETS:
            known = ", ".join(TORCHVISION_DATASETS)
            raise DataError(f"torchvision: unknown domain '{domain}' (known: {known})")
        cls = getattr(datasets, TORCHVISION_DATASETS[domain])
        parts = []
        for train in (True, False):
            try:
                data = cls(str(self.root), train=train, download=False)
            except RuntimeError as exc:
                raise DataError(
                    f"torchvision: {TORCHVISION_DATASETS[domain]} is not under {self.root} "
                    f"({str(exc).strip()}); copy its files there (nothing is downloaded)"
                ) from None
            parts += [to_digit_images(data.data.numpy(), "NHW"), to_labels(data.targets.numpy())]
        split = DomainSplit(domain, *parts, tuple(str(c) for c in range(10)))
        return split.validate(fix=f"check the {TORCHVISION_DATASETS[domain]} files in {self.root}")
