"""Before round 1: wait for the silos, ask each who it is, and check it against the config."""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedalign.config import Silo
from fedalign.errors import FederationError
from fedalign.protocol import CONFIG, INFO, METRICS, SILO, to_config

log = logging.getLogger("fedalign.server")


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node IDs once at least ``expected`` SuperNodes are connected, else FederationError."""
    deadline = time.monotonic() + timeout
    announced = -1
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if len(nodes) != announced:
            log.info("waiting for silos: %d/%d connected", len(nodes), expected)
            announced = len(nodes)
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)}/{expected} silos connected within {timeout:.0f}s; "
                "check that every SuperNode is running and can reach the SuperLink (see its log)"
            )
        time.sleep(0.5)
    return nodes


def discover_silos(
    grid: Grid, silos: list[Silo], timeout: float, data_config: dict[str, object]
) -> dict[int, Silo]:
    """Map node IDs to the configured silos; one-line FederationError on any mismatch."""
    nodes = wait_for_nodes(grid, len(silos), timeout)
    content = RecordDict({CONFIG: to_config(data_config)})
    messages = [Message(content, node, INFO) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    roster: dict[int, Silo] = {}
    for reply in replies:
        if reply.has_error():
            raise FederationError(reply.error.reason.strip().splitlines()[-1])
        info = reply.content[SILO]
        silo = Silo(domain=str(info["domain"]), role=str(info["role"]))
        counts = reply.content[METRICS]
        log.info(
            "silo %s (%s) on node %d: %d train / %d test samples",
            silo.domain,
            silo.role,
            reply.metadata.src_node_id,
            counts["num-train"],
            counts["num-test"],
        )
        roster[reply.metadata.src_node_id] = silo
    if len(replies) < len(nodes):
        raise FederationError(
            f"{len(nodes) - len(replies)} silo(s) did not answer within {timeout:.0f}s; "
            "check their SuperNode logs"
        )
    _check_roster(roster, silos)
    return roster


def _check_roster(roster: dict[int, Silo], silos: list[Silo]) -> None:
    expected = {s.domain: s.role for s in silos}
    seen: dict[str, int] = {}
    for node, silo in roster.items():
        if silo.domain not in expected:
            raise FederationError(
                f"node {node} serves domain '{silo.domain}', which this run does not use "
                f"(data.domains={sorted(expected)}); stop that SuperNode or add the domain"
            )
        if silo.domain in seen:
            raise FederationError(
                f"two silos serve domain '{silo.domain}' (nodes {seen[silo.domain]} and {node}); "
                "each domain needs exactly one SuperNode"
            )
        if silo.role != expected[silo.domain]:
            raise FederationError(
                f"silo '{silo.domain}' says role={silo.role!r} but the run expects "
                f"role={expected[silo.domain]!r} (data.target decides); fix its --node-config"
            )
        seen[silo.domain] = node
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise FederationError(f"no silo serves domain(s) {missing}; start their SuperNodes")
