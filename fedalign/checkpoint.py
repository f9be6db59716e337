"""Checkpoints: one file written atomically, checked before anything is loaded (Flower-free).

A checkpoint is an ``.npz`` holding named groups of arrays (``<group>/<name>``) and one JSON
document (``__state__``) that also carries a SHA-256 over every array's name, dtype, shape and
bytes. It is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash leaves either the previous checkpoint or the new one, never half a file.
``load`` recomputes the digest: a truncated, edited or foreign file raises ``CheckpointError``
and nothing of it is used.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedalign.data.cache import array_checksum, atomic_write_bytes
from fedalign.errors import FedalignError

STATE = "__state__"
FORMAT = 1


class CheckpointError(FedalignError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


def save(path: Path, state: dict[str, Any], groups: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``state`` (JSON-able) and ``groups`` of arrays to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{group}/{name}": a for group, arrays in groups.items() for name, a in arrays.items()}
    document = {"format": FORMAT, "state": state, "sha256": array_checksum(flat)}
    flat[STATE] = np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    atomic_write_bytes(path, buffer.getvalue())


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
    if document.get("format") != FORMAT or document.get("sha256") != array_checksum(flat):
        raise CheckpointError(
            f"checkpoint {path} failed its integrity check (sha256 mismatch); it was not loaded"
        )
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = array
    return document["state"], groups
