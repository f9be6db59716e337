"""The wire protocol: message types, record keys, and the record helpers both sides use.

The server side (``strategies/``, ``server/``) and the silos (``client/``) speak only through
these names. What each strategy puts into a message's ``config`` record is written by its
settings (``fedalign/settings/``): ``to_wire`` on the server, ``from_wire`` on the silo.
This is the one module of the core that knows Flower's record types.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

# Message types of the protocol (besides Flower's ``train`` and ``evaluate``).
INFO = "query.info"
EMBED = "query.embed"  # FedKA: target silo evaluates and embeds
VOTE = "train.vote"  # FedKA: target silo votes, fine-tunes, evaluates and embeds

# Record keys inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SILO = "silo"
EMBEDDINGS = "embeddings"  # target-domain features (M x D), FedKA's alignment anchors
CLASS_STATS = "class-stats"  # target class means (C x D), pooled variance (D), present mask (C)
FISHER = "fisher"  # a source's diagonal Fisher, one array per parameter
FISHER_SCALE = "fisher-scale"  # per-array scales of a float16-transported Fisher

# Metric keys a FedDG-GA source adds to its train reply: its trained model on its test split.
TRAINED_ACCURACY = "trained-test-accuracy"
TRAINED_LOSS = "trained-test-loss"


def source_model_key(domain: str) -> str:
    """Record key of one source silo's model inside a ``train.vote`` message."""
    return f"model.{domain}"


def source_domain(key: str) -> str | None:
    """Inverse of :func:`source_model_key` (None for other keys)."""
    return key.removeprefix("model.") if key.startswith("model.") else None


def to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (names and order kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in weights.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def to_config(values: Mapping[str, object]) -> ConfigRecord:
    """A flat mapping of scalars -> ConfigRecord (``None`` values are dropped)."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})
