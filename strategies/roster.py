"""The run's silos by node ID, and taking back a silo whose SuperNode restarted."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedalign.config import Silo
from fedalign.protocol import CONFIG, INFO, SILO

log = logging.getLogger("fedalign.strategy")
REJOIN_TIMEOUT = 60  # seconds a new node has to say who it is


class Roster:
    """Node ID -> silo (domain, role), from discovery; kept current across restarts.

    Parameters
    ----------
    silos : dict[int, Silo]
        Node ID -> silo. Updated in place when a silo rejoins on a new node.
    """

    def __init__(self, silos: dict[int, Silo]) -> None:
        self.silos = silos
        self.strangers: set[int] = set()

    def nodes(self, role: str, grid: Grid | None = None) -> list[int]:
        """Node IDs of ``role``, restricted to connected nodes when ``grid`` is given."""
        connected = set(grid.get_node_ids()) if grid is not None else set(self.silos)
        return sorted(n for n, s in self.silos.items() if s.role == role and n in connected)

    def domains(self, role: str) -> list[str]:
        """The configured domains of ``role``, connected or not."""
        return [s.domain for s in self.silos.values() if s.role == role]

    def domain(self, node_id: int) -> str:
        """The domain of ``node_id`` (``node <id>`` for a node of no silo)."""
        silo = self.silos.get(node_id)
        return silo.domain if silo else f"node {node_id}"

    def absent(self, grid: Grid) -> set[str]:
        """Domains whose node is no longer connected."""
        connected = set(grid.get_node_ids())
        return {s.domain for n, s in self.silos.items() if n not in connected}

    def rejoin(self, grid: Grid, config: ConfigRecord) -> None:
        """Take back a silo whose SuperNode restarted: Flower gives it a new node ID, so ask
        every unknown node who it is (``query.info``) and let a configured silo replace its
        old node.

        Parameters
        ----------
        grid : Grid
            The run's grid.
        config : ConfigRecord
            Sent with ``query.info`` (the data settings a silo needs to answer).
        """
        new = sorted(set(grid.get_node_ids()) - set(self.silos) - self.strangers)
        if not new:
            return
        messages = [Message(RecordDict({CONFIG: config}), node, INFO) for node in new]
        replies = grid.send_and_receive(messages, timeout=REJOIN_TIMEOUT)
        expected = {s.domain: s.role for s in self.silos.values()}
        for reply in replies:
            node = reply.metadata.src_node_id
            silo = None if reply.has_error() else reply.content.config_records.get(SILO)
            if silo is None or expected.get(str(silo["domain"])) != str(silo["role"]):
                self.strangers.add(node)
                log.warning("node %d is not a silo of this run; it is ignored", node)
                continue
            domain = str(silo["domain"])
            for old in [n for n, s in self.silos.items() if s.domain == domain]:
                del self.silos[old]
            self.silos[node] = Silo(domain, str(silo["role"]))
            log.info("silo %s rejoined on node %d", domain, node)
