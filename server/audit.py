"""The boundary audit: one JSON line per message that crosses the SuperLink.

Each line says which way it went, which silo, the message type, and the shape of every
record in it (array names, shapes and dtypes; config and metric keys), so that anyone can
check what left a silo. Written to ``<run_dir>/boundary.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Message


def describe(message: Message) -> dict[str, Any]:
    """Records of ``message`` without their values (arrays: shape and dtype only)."""
    if not message.has_content():
        return {"error": message.error.reason if message.has_error() else None}
    content = message.content
    return {
        "arrays": {
            name: {key: [array.dtype, list(array.shape)] for key, array in record.items()}
            for name, record in content.array_records.items()
        },
        "metrics": {name: sorted(record) for name, record in content.metric_records.items()},
        "configs": {name: sorted(record) for name, record in content.config_records.items()},
    }


class BoundaryAudit:
    """A MeteredGrid tap that appends every message's description to ``path``.

    ``names`` maps node IDs to silo names once discovery has run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names: dict[int, str] = {}
        path.write_text("")

    def __call__(self, direction: str, message: Message, size: int) -> None:
        node = (
            message.metadata.dst_node_id if direction == "sent" else (message.metadata.src_node_id)
        )
        line = {
            "direction": direction,
            "type": message.metadata.message_type,
            "node": node,
            "silo": self.names.get(node),
            "bytes": size,
            **describe(message),
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
