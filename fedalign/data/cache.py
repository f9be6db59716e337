"""On-disk cache of built Digits-5 domains, checked on every load.

Layout: ``<cache>/digits5/<domain>.npz`` holds a domain's arrays and
``<cache>/digits5/manifest.json`` records, per domain, the builder version, the seed, the array
shapes and dtypes, and a sha256 over the array contents (see ``array_checksum``), so that a
corrupt or stale file is noticed whatever the zip container looks like.

Concurrency: every file is written atomically (``fedalign/atomic.py``). Building a domain
holds ``.<domain>.lock`` (``fcntl.flock``), so two processes asking for the same domain build it
once; updating the manifest holds ``.manifest.lock`` for the read-modify-write only, so
processes building different domains run in parallel and each entry survives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from fedalign import atomic
from fedalign.data.digits5 import (
    BUILDER_VERSION,
    DIGIT_CLASSES,
    DIGITS5_DOMAINS,
    build_domain,
    check_domain,
)
from fedalign.data.types import DataError, DomainSplit

Rebuild = Literal["auto", "never", "always"]
SUBDIR = "digits5"
MANIFEST = "manifest.json"
_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
_FIX = "run `fedalign data build --force`"
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

logger = logging.getLogger("fedalign.data")


def default_cache_dir() -> Path:
    """``$FEDALIGN_CACHE`` if set, else ``$XDG_CACHE_HOME/fedalign`` or ``~/.cache/fedalign``."""
    if os.environ.get("FEDALIGN_CACHE"):
        return Path(os.environ["FEDALIGN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedalign"


def array_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``arrays``, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block. In a folder
    nobody may write (a silo's data mounted read-only) nothing can change: no lock is needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(root: Path) -> dict[str, Any]:
    """The per-domain manifest entries; empty when the manifest is missing or unreadable."""
    try:
        domains = json.loads((root / MANIFEST).read_text())["domains"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return domains if isinstance(domains, dict) else {}


def _record(root: Path, name: str, entry: dict[str, Any]) -> None:
    """Set the manifest entry of ``name``, keeping the entries other processes wrote."""
    with _locked(root / ".manifest.lock"):
        domains = _read_manifest(root) | {name: entry}
        text = json.dumps({"format": 1, "domains": domains}, indent=2, sort_keys=True)
        atomic.write_bytes(root / MANIFEST, (text + "\n").encode())


def _write_domain(root: Path, name: str, seed: int, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic.write_bytes(root / f"{name}.npz", buffer.getvalue())
    _record(
        root,
        name,
        {
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "sha256": array_checksum(arrays),
            "arrays": {
                k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()
            },
        },
    )


def _read_checked(
    root: Path, name: str, seed: int
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Read a cached domain; return its arrays, or ``None`` and why it cannot be used.

    The reason is ``None`` when the file is simply missing.
    """
    path = root / f"{name}.npz"
    if not path.exists():
        return None, None
    entry = _read_manifest(root).get(name)
    if not isinstance(entry, dict):
        return None, f"not recorded in {MANIFEST}"
    if entry.get("builder_version") != BUILDER_VERSION:
        return None, (
            f"stale (builder version {entry.get('builder_version')}, current {BUILDER_VERSION})"
        )
    if entry.get("seed") != seed:
        return None, f"stale (built with seed {entry.get('seed')}, requested {seed})"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except _UNREADABLE as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if any(key not in arrays for key in _REQUIRED):
        return None, "corrupt (arrays missing)"
    if array_checksum(arrays) != entry.get("sha256"):
        return None, "corrupt (checksum mismatch)"
    return arrays, None


def _ensure(
    name: str, cache_dir: Path | str | None, seed: int, rebuild: Rebuild
) -> tuple[Path, dict[str, np.ndarray]]:
    """Make sure a valid ``name`` is cached; return its path and arrays."""
    check_domain(name)
    if rebuild not in ("auto", "never", "always"):
        raise DataError(f"rebuild must be 'auto', 'never' or 'always', got {rebuild!r}")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / SUBDIR
    path = root / f"{name}.npz"
    with _locked(root / f".{name}.lock"):
        if rebuild != "always":
            arrays, problem = _read_checked(root, name, seed)
            if arrays is not None:
                return path, arrays
            if problem is not None and rebuild == "never":
                raise DataError(f"digits5 domain '{name}' at {path} is {problem}; {_FIX}")
            if problem is not None:
                logger.warning("digits5 domain '%s' at %s is %s; rebuilding", name, path, problem)
        logger.info("building digits5 domain '%s' (seed %d) into %s", name, seed, path)
        arrays = build_domain(name, seed)
        _write_domain(root, name, seed, arrays)
    return path, arrays


def ensure_domain(
    name: str, cache_dir: Path | str | None = None, seed: int = 0, rebuild: Rebuild = "auto"
) -> Path:
    """Return the path of a valid cached domain, building it if missing.

    A corrupt (unreadable, checksum mismatch) or stale (other builder version or seed) file
    is rebuilt with one warning when ``rebuild="auto"``, raises ``DataError`` when
    ``rebuild="never"``, and ``rebuild="always"`` rebuilds unconditionally. A missing file is
    always built.
    """
    return _ensure(name, cache_dir, seed, rebuild)[0]


def load_domain(
    name: str, cache_dir: Path | str | None = None, seed: int = 0, rebuild: Rebuild = "auto"
) -> DomainSplit:
    """Ensure, load, checksum-verify and validate one Digits-5 domain."""
    _, arrays = _ensure(name, cache_dir, seed, rebuild)
    split = DomainSplit(
        name=name,
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        classes=DIGIT_CLASSES,
    )
    return split.validate()


def build_all(
    cache_dir: Path | str | None = None,
    seed: int = 0,
    force: bool = False,
    domains: Sequence[str] = DIGITS5_DOMAINS,
) -> dict[str, Path]:
    """Ensure every domain in ``domains`` is cached (rebuilding all if ``force``)."""
    for name in domains:
        check_domain(name)
    paths = {}
    try:
        for name in tqdm(domains, desc="digits5", unit="domain", disable=None):
            paths[name] = ensure_domain(name, cache_dir, seed, "always" if force else "auto")
    except OSError as exc:
        raise DataError(
            f"data cache {cache_dir or default_cache_dir()}: {exc.strerror or exc} "
            f"({exc.filename}); set data.cache_dir to a folder this user can write"
        ) from None
    return paths
