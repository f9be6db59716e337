"""Checkpoints: one file written atomically, checked before anything is loaded (Flower-free).

A checkpoint is an ``.npz`` holding named groups of arrays (``<group>/<name>``) and one JSON
document (``__state__``) that also carries a SHA-256 over every array's name, dtype, shape and
bytes. It is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash leaves either the previous checkpoint or the new one, never half a file.
``load`` recomputes the digest: a truncated, edited or foreign file raises ``CheckpointError``
and nothing of it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedalign.errors import FedalignError

STATE = "__state__"
FORMAT = 1


class CheckpointError(FedalignError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        sha.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def save(path: Path, state: dict[str, Any], groups: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``state`` (JSON-able) and ``groups`` of arrays to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{group}/{name}": a for group, arrays in groups.items() for name, a in arrays.items()}
    document = {"format": FORMAT, "state": state, "sha256": _digest(flat)}
    flat[STATE] = np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **flat)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The state and array groups of the checkpoint at ``path``, verified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {name: data[name] for name in data.files}
        document = json.loads(flat.pop(STATE).tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); it was not loaded"
        ) from None
    if document.get("format") != FORMAT or document.get("sha256") != _digest(flat):
        raise CheckpointError(
            f"checkpoint {path} failed its integrity check (sha256 mismatch); it was not loaded"
        )
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = array
    return document["state"], groups
