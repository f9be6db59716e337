"""Shared fixtures: one offline benchmark cache per session, and an in-process Flower grid."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from server.processes import port_in_use

SMALL_DOMAINS = ("mnist", "usps", "mnistm")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the domains the federation tests use (built once)."""
    from fedalign.data import build_all

    cache = tmp_path_factory.mktemp("digits-cache")
    build_all(cache_dir=cache, domains=SMALL_DOMAINS)
    return cache


@pytest.fixture
def task_identity() -> None:
    """Flower's Message() needs a task identity; a real run sets it, unit tests set it here."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def silo_config(cache: Path | str, **extra: object) -> dict:
    """What the server tells a silo in a message (data, model, training), for tests."""
    return {
        "data-source": "digits5",
        "data-seed": 0,
        "data-cache-dir": str(cache),
        "model": "digit_cnn",
        "num-classes": 10,
        "in-channels": 3,
        "device": "cpu",
        "seed": 0,
        "local-steps": 15,
        "batch-size": 32,
        "lr": 1e-3,
        "optimizer": "adam",
        "server-round": 1,
        **extra,
    }


def make_context(node_id: int, node_config: dict, run_config: dict | None = None) -> Context:
    return Context(
        run_id=0,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config or {},
    )


class InProcessGrid(Grid):
    """A Grid that delivers each message to a ClientApp in this process (no SuperLink).

    ``nodes`` maps node ID -> node-config. ``intercept(message, reply)`` may replace replies.
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        nodes: dict[int, dict],
        intercept: Callable[[Message, Message], Message] | None = None,
    ) -> None:
        self.client_app = client_app
        self.nodes = nodes
        self.intercept = intercept
        self.contexts = {nid: make_context(nid, cfg) for nid, cfg in nodes.items()}
        self.pending: dict[str, Message] = {}

    def set_run(self, run: object) -> None:  # pragma: no cover - not used in-process
        pass

    @property
    def run(self) -> object:  # pragma: no cover - not used in-process
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            reply.metadata.__dict__["_reply_to_message_id"] = message.object_id
            if self.intercept is not None:
                reply = self.intercept(message, reply)
            self.pending[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def port_overrides(silos: int = 3) -> list[str]:
    control, fleet, *_ = ports = free_ports(2 + silos)
    # SuperNode ports are consecutive from supernode_ports_from: find a free run of them.
    base = max(ports) + 1
    while any(port_in_use("127.0.0.1", base + i) for i in range(silos)):
        base += silos
    return [
        f"federation.control_port={control}",
        f"federation.fleet_port={fleet}",
        f"federation.supernode_ports_from={base}",
    ]
