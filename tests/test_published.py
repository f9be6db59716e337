"""Published digit data on disk: the Digit-Five .mat bundle and torchvision's own layout, built
here from real digits in exactly the published layouts (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from fedalign.data import DataError, get_source, load_domain
from fedalign.data.published import to_digit_images


@pytest.fixture(scope="module")
def digits(digits_cache):
    """Real usps digits: grey 28x28 uint8 images and labels, 100 train and 40 test."""
    split = load_domain("usps", digits_cache)
    grey = split.x_train[:, 0]
    return grey[:100], split.y_train[:100], grey[100:140], split.y_train[100:140]


def one_hot(y):
    return np.eye(10, dtype=np.uint8)[y]


def pad32(x):
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))


def write_digit_five(root, digits):
    x_tr, y_tr, x_te, y_te = digits

    def rgb(x):  # N x H x W x 3
        return np.repeat(x[..., None], 3, axis=3)

    def svhn(x, y):  # H x W x 3 x N, and 10 for the digit 0
        return {"X": rgb(pad32(x)).transpose(1, 2, 3, 0), "y": np.where(y == 0, 10, y)[:, None]}

    savemat(
        root / "mnist_data.mat",
        {
            "train_32": pad32(x_tr),
            "label_train": one_hot(y_tr),
            "test_32": pad32(x_te),
            "label_test": one_hot(y_te),
        },
    )
    savemat(
        root / "mnistm_with_label.mat",
        {
            "train": rgb(x_tr),
            "label_train": one_hot(y_tr),
            "test": rgb(x_te),
            "label_test": one_hot(y_te),
        },
    )
    savemat(
        root / "syn_number.mat",
        {
            "train_data": rgb(pad32(x_tr)),
            "train_label": y_tr[:, None],
            "test_data": rgb(pad32(x_te)),
            "test_label": y_te[:, None],
        },
    )
    savemat(root / "svhn_train_32x32.mat", svhn(x_tr, y_tr))
    savemat(root / "svhn_test_32x32.mat", svhn(x_te, y_te))
    dataset = np.empty((2, 2), dtype=object)
    dataset[0, 0], dataset[0, 1] = x_tr[:, None] / 255.0, y_tr[:, None]
    dataset[1, 0], dataset[1, 1] = x_te[:, None] / 255.0, y_te[:, None]
    savemat(root / "usps_28x28.mat", {"dataset": dataset})  # fmt: skip


@pytest.mark.parametrize("domain", ["mnist", "mnistm", "syn", "svhn", "usps"])
def test_digit_five_bundle_loads_every_domain(tmp_path, digits, domain):
    write_digit_five(tmp_path, digits)
    split = get_source("digit_five", cache_dir=tmp_path).load(domain)
    assert split.x_train.shape == (100, 3, 28, 28) and split.x_train.dtype == np.uint8
    assert np.array_equal(split.y_train, digits[1]) and np.array_equal(split.y_test, digits[3])
    # The image survives the round trip through its layout (padding, channels, scale).
    original = digits[0][:1]
    if domain in ("mnist", "syn", "svhn"):  # stored 32x32 with a 2-pixel border
        original = to_digit_images(pad32(original), "NHW")[:, 0]
    assert np.abs(original[0].astype(int) - split.x_train[0, 0].astype(int)).max() <= 1


def test_digit_five_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match=r"svhn_train_32x32\.mat is missing"):
        get_source("digit_five", cache_dir=tmp_path).load("svhn")
    savemat(tmp_path / "mnist_data.mat", {"something": np.zeros(3)})
    with pytest.raises(DataError, match="lacks the Digit-Five layout"):
        get_source("digit_five", cache_dir=tmp_path).load("mnist")


def write_idx(path, array):
    """The MNIST idx format torchvision reads: magic, dims, then the bytes."""
    kind = 0x0803 if array.ndim == 3 else 0x0801
    header = kind.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_on_disk(tmp_path, digits):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x_tr, y_tr, x_te, y_te = digits
    write_idx(raw / "train-images-idx3-ubyte", x_tr)
    write_idx(raw / "train-labels-idx1-ubyte", y_tr)
    write_idx(raw / "t10k-images-idx3-ubyte", x_te)
    write_idx(raw / "t10k-labels-idx1-ubyte", y_te)
    split = get_source("torchvision", cache_dir=tmp_path).load("mnist")
    assert split.x_test.shape == (40, 3, 28, 28)
    assert np.array_equal(split.y_train, y_tr)
    assert np.array_equal(split.x_train[:, 0], x_tr)
    with pytest.raises(DataError, match="KMNIST is not under"):
        get_source("torchvision", cache_dir=tmp_path).load("kmnist")
