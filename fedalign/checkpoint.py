"""Checkpoints: one file written atomically, checked before anything is loaded (Flower-free).

A checkpoint is an ``.npz`` holding named groups of arrays (``<group>/<name>``) and one JSON
document (``__state__``) that also carries a SHA-256 over every array's name, dtype, shape and
bytes. It is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash leaves either the previous checkpoint or the new one, never half a file.
``load`` recomputes the digest: a truncated, edited or foreign file raises ``CheckpointError``
and nothing of it is used.

A run folder's checkpoint is ``CHECKPOINT``, written after every round; ``load_resume`` and
``resume_config`` give what ``resume=true`` continues from, checked against the run's config.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedalign import atomic
from fedalign.config import RUN_LOCAL_KEYS, learning_config, to_json, validate
from fedalign.data.cache import array_checksum
from fedalign.errors import FedalignError

STATE = "__state__"
FORMAT = 1
CHECKPOINT = "checkpoint.npz"  # in a run folder: the state after the last finished round


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
    atomic.write_bytes(path, buffer.getvalue())


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


def identity(cfg: DictConfig) -> str:
    """The config as far as a resumed run must match it."""
    return json.dumps(learning_config(json.loads(to_json(cfg))), sort_keys=True)


def load_resume(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The verified checkpoint of ``run_dir`` for ``resume=true`` (FedalignError if unusable)."""
    state, groups = load(run_dir / CHECKPOINT)
    if state.get("config") != identity(cfg):
        raise CheckpointError(
            f"checkpoint {run_dir / CHECKPOINT} was written with a different config (strategy, "
            "data, model or training settings); resume it without overrides (its config.yaml is "
            "used)"
        )
    return state, groups


def resume_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config to resume ``run_dir`` with: its own ``config.yaml``, with the command line's
    overrides of keys a resumed run may change (``RUN_LOCAL_KEYS``: ports, output, W&B)
    applied; an override that would change the run itself is refused in one line. A folder
    without ``config.yaml`` is resumed with ``cfg`` (its checkpoint is checked against it).

    Parameters
    ----------
    cfg : DictConfig
        The config composed from the command line.
    run_dir : Path
        The run folder to resume.
    overrides : list of str
        The command line's Hydra overrides (``key=value``).

    Returns
    -------
    DictConfig
        The saved config with ``resume`` and ``output.run_dir`` set to this run.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        resumed = cfg.copy()
    else:
        resumed = OmegaConf.load(saved_path)
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if "=" not in override or key.startswith(("hydra.", "hydra/")):
                continue
            value = OmegaConf.select(cfg, key)
            if key.split(".")[0].split("/")[0] in RUN_LOCAL_KEYS:
                OmegaConf.update(resumed, key, value, force_add=True)
            elif value != OmegaConf.select(resumed, key):
                raise CheckpointError(
                    f"resume: {override} would change the run in {run_dir} (its config.yaml "
                    f"has {key}={OmegaConf.select(resumed, key)}); resume without it, or start "
                    "a new run"
                )
    OmegaConf.update(resumed, "resume", cfg.resume, force_add=True)
    OmegaConf.update(resumed, "output.run_dir", str(run_dir), force_add=True)
    validate(resumed)
    return resumed
