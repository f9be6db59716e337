"""A run without orchestration: the same ServerApp logic and ClientApps, all in this process.

``InProcessGrid`` hands every message straight to the ClientApp object of its silo (one Flower
``Context`` per silo, kept between messages), one message after another: no SuperLink, no
SuperNode, no serialisation, no ClientApp process. It is the baseline that
``bench/bench_overhead.py`` divides the real deployment by, and the grid the unit tests run
strategies on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedalign.config import silos, to_json


def make_context(node_id: int, node_config: dict, run_config: dict | None = None) -> Context:
    """A fresh Flower Context for a silo with this node-config."""
    return Context(
        run_id=0,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config or {},
    )


class InProcessGrid(Grid):
    """A Grid that delivers each message to a ClientApp in this process (no SuperLink).

    Parameters
    ----------
    client_app : callable
        The ClientApp (``client.app.app``) or any ``(message, context) -> reply``.
    nodes : dict[int, dict]
        Node ID -> node-config.
    intercept : callable, optional
        ``intercept(message, reply)`` may replace a reply (tests inject faults with it).
    run_config : dict, optional
        Every silo's Flower run-config.
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        nodes: dict[int, dict],
        intercept: Callable[[Message, Message], Message] | None = None,
        run_config: dict | None = None,
    ) -> None:
        self.client_app = client_app
        self.nodes = nodes
        self.intercept = intercept
        self.contexts = {nid: make_context(nid, cfg, run_config) for nid, cfg in nodes.items()}
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
            # Flower 1.39 has no public setter for a message ID; its own grids write it so too.
            message.metadata.__dict__["_message_id"] = message.object_id
            # The reply is Message(..., reply_to=message): its source and reply-to ID follow.
            reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            if self.intercept is not None:
                reply = self.intercept(message, reply)
            self.pending[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    cfg: DictConfig, run_dir: Path, threads: int, runtime_dir: Path | None = None
) -> dict[str, Any]:
    """Run ``cfg`` with every silo in this process (torch on ``threads`` threads); returns the
    summary. The run folder has the same files as a deployed run's. With ``runtime_dir``, every
    silo's messages go through the silo runtime serving that folder (``client/warm.py``), as
    on a warm deployment but without Flower's processes."""
    from flwr.supercore.task_identity import TaskIdentity
    from omegaconf import OmegaConf

    from client.app import app as client_app
    from fedalign.runlog import RunRecorder
    from server.app import run

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 1, 0  # Message() needs it
    nodes = {}
    for index, silo in enumerate(silos(cfg), start=1):
        nodes[index] = {"domain": silo.domain, "role": silo.role, "threads": threads}
        if cfg.data.cache_dir:
            nodes[index]["data-dir"] = str(cfg.data.cache_dir)
        if runtime_dir is not None:
            nodes[index]["runtime-dir"] = str(runtime_dir)
    grid = InProcessGrid(client_app, nodes, run_config={"config-json": to_json(cfg)})
    config = OmegaConf.to_container(cfg, resolve=True)
    recorder = RunRecorder(run_dir, config, cfg.data.target)
    extra = run(grid, cfg, recorder)
    return recorder.finish("completed", **extra)
