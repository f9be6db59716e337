"""A silo's state between rounds, kept on the silo's own disk so that a resumed run is exact.

Within a run the state (the local optimizer's moments, FedBN's local BatchNorm) lives in
Flower's ``Context.state``. A resumed run is a new Flower run with a fresh Context, so after each
round the silo also writes that state to ``<state-dir>/<run-key>/<domain>-round<r>.npz``
(``fedalign.checkpoint``: atomic, verified). When round r arrives and the Context does not hold
the state of round r-1, the silo loads that file. Nothing of it leaves the silo.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context

from client.silo import SiloIdentity
from fedalign.checkpoint import CheckpointError, load, save
from fedalign.protocol import from_record, to_record

log = logging.getLogger("fedalign.client")
ROUND = "state-round"  # Context.state key: the round whose end the state describes
SAFE = re.compile(r"[^A-Za-z0-9._-]")
STATE_DIR_ENV = "FEDALIGN_STATE_DIR"  # a container's state volume, when node-config has none


def state_folder(silo: SiloIdentity, run_key: str) -> Path:
    from fedalign.data.cache import default_cache_dir

    chosen = silo.state_dir or os.environ.get(STATE_DIR_ENV)
    root = Path(chosen) if chosen else default_cache_dir() / "silo-state"
    return root / SAFE.sub("_", run_key)


def _path(silo: SiloIdentity, run_key: str, rnd: int) -> Path:
    return state_folder(silo, run_key) / f"{SAFE.sub('_', silo.domain)}-round{rnd}.npz"


def ensure(context: Context, silo: SiloIdentity, cfg: dict, tag: str) -> None:
    """Make ``context.state`` hold the state after round ``server-round - 1`` if any exists."""
    run_key, rnd = str(cfg.get("run-key", "")), int(cfg.get("server-round", 0))
    held = context.state.config_records.get(ROUND)
    if not run_key or rnd <= 1 or (held is not None and int(held["round"]) == rnd - 1):
        return
    path = _path(silo, run_key, rnd - 1)
    if not path.is_file():
        return
    try:
        state, groups = load(path)
    except CheckpointError as exc:
        log.warning("%s %s; starting from a fresh local state", tag, exc)
        return
    for key, arrays in groups.items():
        context.state[key] = to_record(arrays)
    for key, values in state["configs"].items():
        context.state[key] = ConfigRecord(values)
    context.state[ROUND] = ConfigRecord({"round": rnd - 1})
    log.info("%s restored its local state after round %d from %s", tag, rnd - 1, path)


def persist(context: Context, silo: SiloIdentity, cfg: dict) -> None:
    """Write ``context.state`` after this round to disk; keep only this and the last round."""
    run_key, rnd = str(cfg.get("run-key", "")), int(cfg.get("server-round", 0))
    context.state[ROUND] = ConfigRecord({"round": rnd})
    if not run_key or rnd < 1:
        return
    groups = {k: from_record(v) for k, v in context.state.items() if isinstance(v, ArrayRecord)}
    if not groups:
        return
    configs = {
        k: dict(v) for k, v in context.state.items() if isinstance(v, ConfigRecord) and k != ROUND
    }
    save(_path(silo, run_key, rnd), {"configs": configs}, groups)
    for old in state_folder(silo, run_key).glob(f"{SAFE.sub('_', silo.domain)}-round*.npz"):
        if int(old.stem.rsplit("round", 1)[1]) < rnd - 1:
            old.unlink(missing_ok=True)


def discard(silo: SiloIdentity, cfg: dict) -> None:
    """The run is over: remove this silo's state files for it."""
    run_key = str(cfg.get("run-key", ""))
    if not run_key:
        return
    folder = state_folder(silo, run_key)
    for old in folder.glob(f"{SAFE.sub('_', silo.domain)}-round*.npz"):
        old.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
