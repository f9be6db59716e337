"""Checks a source's train reply against the global model it was sent, before aggregation."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from fedalign.protocol import ARRAYS, METRICS

# Train metrics that describe the received model, not the local update.
RECEIVED_KEYS = ("received-test-accuracy", "received-test-loss")


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 distance between ``arrays`` and ``reference`` over all their float arrays.

    Parameters
    ----------
    arrays : dict of str to np.ndarray
        A source's weights.
    reference : dict of str to np.ndarray
        The global model the source was sent.
    """
    total = 0.0
    for name, values in arrays.items():
        if np.issubdtype(values.dtype, np.floating):
            diff = values.astype(np.float64) - reference[name]
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return total**0.5


class ReplyValidator:
    """Why a train reply cannot be aggregated: records, array names, shapes and dtypes against
    the global model, finite values, the update's norm, and the metrics the round needs.

    Parameters
    ----------
    max_update_norm : float, optional
        ``updates.max_norm``: the largest L2 distance of a reply's weights from the global model.
    """

    def __init__(self, max_update_norm: float | None = None) -> None:
        self.max_update_norm = max_update_norm
        self.sent: dict[str, tuple[tuple[int, ...], str]] = {}
        self.reference: dict[str, np.ndarray] = {}

    def expect(self, arrays: ArrayRecord) -> None:
        """Remember the global model of this round's ``train`` messages."""
        self.sent = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        norm = self.max_update_norm
        self.reference = {k: a.numpy() for k, a in arrays.items()} if norm else {}

    def problem(self, reply: Message) -> str | None:
        """Why ``reply`` cannot be aggregated, or None when it can."""
        content = reply.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return f"missing records (has {sorted(content.keys())})"
        arrays = content[ARRAYS]
        if set(arrays) != set(self.sent):
            return f"arrays {sorted(set(arrays) ^ set(self.sent))[:3]} do not match the model"
        values = {}  # each array deserialized once, for both checks
        for name, array in arrays.items():
            if (tuple(array.shape), array.dtype) != self.sent[name]:
                return f"array '{name}' is {array.dtype}{list(array.shape)}, expected " + (
                    f"{self.sent[name][1]}{list(self.sent[name][0])}"
                )
            values[name] = array.numpy()
            if not np.isfinite(values[name]).all():
                return f"array '{name}' has non-finite values"
        if self.max_update_norm is not None:
            norm = update_norm(values, self.reference)
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds updates.max_norm={self.max_update_norm:g}"
        metrics = content[METRICS]
        if not metrics.get("num-examples", 0) > 0:
            return "metrics lack a positive num-examples"
        if any(key not in metrics for key in RECEIVED_KEYS):
            return f"metrics lack {', '.join(RECEIVED_KEYS)}"
        return None
