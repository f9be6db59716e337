"""A site's own data: ImageFolder trees and .npz feature files behind the one loader interface,
the MLP for feature silos, and `fedalign silo check` (good data and broken data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedalign.data import DataError, get_source, load_domain
from fedalign.data.schema import check_split, class_counts
from fedalign.models import build_model
from fedalign.train import evaluate, to_input

FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def image_tree(root: Path, cache: Path, per_class: int = 6, split: bool = False) -> Path:
    """An ImageFolder tree of real usps digits saved as PNG/JPEG of assorted sizes and modes."""
    data = load_domain("usps", cache)
    for label in range(10):
        for k, i in enumerate(np.flatnonzero(data.y_train == label)[:per_class]):
            part = ("train" if k < per_class - 2 else "test") if split else ""
            folder = root / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(data.x_train[i].transpose(1, 2, 0)).resize((30 + k, 41))
            if k % 2:
                image.convert("L").save(folder / f"{k}.jpg")
            else:
                image.save(folder / f"{k}.png")
    return root


def feature_file(path: Path, n: int = 120, d: int = 16, domains: bool = False) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = rng.normal(size=(n, d)).astype(np.float64) + y[:, None]
    arrays = {"x": x, "y": y, "classes": np.array(["a", "b", "c", "d"])}
    if domains:
        arrays["domain"] = np.where(np.arange(n) < n // 2, "amazon", "webcam")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_image_folder_loads_resized_and_split(tmp_path, digits_cache):
    root = image_tree(tmp_path / "site", digits_cache)
    split = get_source("imagefolder", cache_dir=root, image_size=28, channels=3).load("site")
    assert split.x_train.shape[1:] == (3, 28, 28) and split.x_train.dtype == np.uint8
    assert split.classes == tuple(str(i) for i in range(10))
    assert all(test >= 1 for _, test in class_counts(split).values())
    assert len(split.y_train) + len(split.y_test) == 60
    again = get_source("imagefolder", cache_dir=root).load("site")
    assert np.array_equal(again.y_test, split.y_test), "the split is deterministic"
    gray = get_source("imagefolder", cache_dir=root, channels=1, image_size=20).load("site")
    assert gray.x_test.shape[1:] == (1, 20, 20)


def test_image_folder_with_its_own_train_and_test(tmp_path, digits_cache):
    root = image_tree(tmp_path / "site", digits_cache, split=True)
    split = get_source("imagefolder", cache_dir=root).load("site")
    assert (len(split.y_train), len(split.y_test)) == (40, 20)


def test_npz_features_with_domains(tmp_path):
    path = feature_file(tmp_path / "office" / "decaf.npz", domains=True)
    source = get_source("npz", cache_dir=path.parent)
    assert source.domains() == ("amazon", "webcam")
    split = source.load("webcam")
    assert split.is_features and split.x_train.dtype == np.float32
    assert len(split.y_train) + len(split.y_test) == 60
    assert split.classes == ("a", "b", "c", "d")
    with pytest.raises(DataError, match="no rows of domain 'dslr'"):
        source.load("dslr")


def test_mlp_learns_a_feature_silo(tmp_path):
    """The feature path end to end in process: float features through to_input and the MLP."""
    from fedalign.train import TrainConfig, train_local

    split = get_source("npz", cache_dir=feature_file(tmp_path / "f" / "x.npz")).load("x")
    torch.manual_seed(0)  # the initial weights, whatever ran before in this worker
    model = build_model("mlp", num_classes=4, in_channels=16)
    assert model.features(to_input(split.x_test, torch.device("cpu"))).shape[1] == 128
    before = evaluate(model, split.x_test, split.y_test, torch.device("cpu"), 64)["test-accuracy"]
    cfg = TrainConfig(local_steps=60, batch_size=16, lr=1e-2, optimizer="adam", seed=0, log_every=0)
    train_local(model, split.x_train, split.y_train, cfg, torch.device("cpu"))
    after = evaluate(model, split.x_test, split.y_test, torch.device("cpu"), 64)["test-accuracy"]
    assert after > max(before, 0.8)


def test_schema_check_names_the_fault(tmp_path, digits_cache):
    split = get_source("imagefolder", cache_dir=image_tree(tmp_path / "s", digits_cache)).load("s")
    with pytest.raises(DataError, match=r"missing \['cat'\], unexpected \['9'\]"):
        check_split(split, [*(str(i) for i in range(9)), "cat"])
    with pytest.raises(DataError, match="only 50 training samples"):
        check_split(split, None, min_train=51)
    assert check_split(split, [str(i) for i in range(10)]) is split


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDALIGN, "silo", "check", *args], capture_output=True, text=True, timeout=120
    )


def test_silo_check_accepts_good_data_and_says_what_leaves(tmp_path, digits_cache):
    root = image_tree(tmp_path / "hospital-a", digits_cache)
    done = run_check(str(root), "--montage", str(tmp_path / "m.png"))
    assert done.returncode == 0, done.stderr
    assert "silo 'hospital-a' (imagefolder" in done.stdout and "images 3x28x28" in done.stdout
    assert "its model weights after local training" in done.stdout
    assert "Never: images, feature vectors, labels" in done.stdout
    assert (tmp_path / "m.png").stat().st_size > 1000
    features = feature_file(tmp_path / "edge" / "sensors.npz")
    done = run_check(str(features.parent), "--classes", "a,b,c,d", "--role", "target")
    assert done.returncode == 0, done.stderr
    assert "feature vectors of 16" in done.stdout and "M embeddings" in done.stdout


def broken_image(tmp_path: Path, cache: Path) -> Path:
    root = image_tree(tmp_path / "broken-image", cache)
    (root / "3" / "scan.png").write_bytes(b"not a png at all")
    return root


def broken_labels(tmp_path: Path, cache: Path) -> Path:
    path = feature_file(tmp_path / "broken-labels" / "f.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["y"][5] = 7  # four classes: 7 is out of range
    np.savez(path, **arrays)
    return path.parent


def wrong_classes(tmp_path: Path, cache: Path) -> Path:
    root = image_tree(tmp_path / "wrong-classes", cache)
    (root / "9").rename(root / "nine")
    return root


def too_few(tmp_path: Path, cache: Path) -> Path:
    return image_tree(tmp_path / "too-few", cache, per_class=2)  # 1 train + 1 test each


@pytest.mark.parametrize(
    ("make", "options", "expected"),
    [
        (broken_image, [], "scan.png is not a readable image (UnidentifiedImageError)"),
        (broken_labels, ["--classes", "a,b,c,d"], "y_train has labels in [0, 7] outside [0, 3]"),
        (wrong_classes, [], "missing ['9'], unexpected ['nine']"),
        (too_few, ["--min-train", "20"], "only 10 training samples (the federation needs at"),
    ],
    ids=["unreadable image", "label out of range", "class names", "too few samples"],
)
def test_silo_check_rejects_broken_data_in_one_line(
    tmp_path, digits_cache, make, options, expected
):
    done = run_check(str(make(tmp_path, digits_cache)), *options)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected in lines[0]


def test_folder_layout_faults_get_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders; lay it out as"):
        get_source("imagefolder", cache_dir=tmp_path / "empty").load("empty")
    feature_file(tmp_path / "two" / "a.npz")
    feature_file(tmp_path / "two" / "b.npz")
    with pytest.raises(
        DataError, match=r"holds 2 \.npz files; give the silo a folder with exactly"
    ):
        get_source("npz", cache_dir=tmp_path / "two").load("two")
