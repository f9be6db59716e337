"""What a round's phases leave in the run record: metrics per silo, missing silos, cost.

A phase's cost is its wall seconds and, when the grid meters bytes (it has ``bytes_sent`` and
``bytes_received``, as ``server.grid.MeteredGrid`` does), the bytes it moved. A reply's silo
comes from the grid's ``replier`` when it has one (an error the SuperLink sends for a silo
names that silo's node only there), else from the reply's source node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.serverapp import Grid

from fedalign.protocol import METRICS
from fedalign.runlog import RunRecorder
from fedalign.settings.tta import METHODS as TTA_METHODS
from fedalign.settings.tta import metric_key
from strategies.roster import Roster
from strategies.validation import RECEIVED_KEYS

log = logging.getLogger("fedalign.strategy")
# Every reply's timing (client/app.py): the silo's work and its ClientApp process's start-up.
TIMING_KEYS = ("handler-seconds", "start-seconds", "import-seconds")
# The target's accuracy after each test-time adaptation (``tta.methods``).
TTA_KEYS = tuple(metric_key(method) for method in TTA_METHODS)


class RoundRecorder:
    """Records the phases of every round into a :class:`RunRecorder`.

    Parameters
    ----------
    recorder : RunRecorder
        Receives every silo's metrics and writes the run folder.
    roster : Roster
        Names the silos.
    """

    def __init__(self, recorder: RunRecorder, roster: Roster) -> None:
        self.recorder = recorder
        self.roster = roster
        self.timeout: float | None = None  # the round timeout, for the log line of the missing
        self.grid: Grid | None = None
        self.expected: set[str] = set()

    @contextmanager
    def phase(self, grid: Grid, rnd: int) -> Iterator[None]:
        """Add the wall seconds (and metered bytes) of the enclosed phase to round ``rnd``."""
        self.grid = grid
        start, marks = time.perf_counter(), _bytes(grid)
        yield
        values: dict[str, float] = {"wall_seconds": time.perf_counter() - start}
        if marks is not None and (now := _bytes(grid)) is not None:
            values["bytes_sent"] = now[0] - marks[0]
            values["bytes_received"] = now[1] - marks[1]
        self.recorder.info(rnd, **values)

    def silo_of(self, reply: Message) -> str:
        """The domain a reply answers for (also for errors the SuperLink sends on its behalf)."""
        replier = getattr(self.grid, "replier", None)
        node = replier(reply) if replier is not None else reply.metadata.src_node_id
        return self.roster.domain(node)

    def expect(self, messages: list[Message]) -> list[Message]:
        """Remember which silos a phase waits for, to name the ones that never answer."""
        self.expected = {self.roster.domain(m.metadata.dst_node_id) for m in messages}
        return messages

    def record_missing(self, rnd: int, replies: list[Message], phase: str) -> None:
        """Log and record silos that sent no usable reply (``dropped`` in the round's metrics)
        and configured silos no longer connected, so never asked (``absent``)."""
        answered = {self.silo_of(r) for r in replies if not r.has_error()}
        missing = sorted(self.expected - answered)
        if self.grid is not None:
            absent = self.roster.absent(self.grid) - self.expected - answered
            if absent:
                known = self.recorder.round_metrics.get(rnd, {}).get("absent", [])
                self.recorder.metrics(rnd, absent=sorted(set(known) | absent))
        if missing:
            log.warning(
                "round %d %s: no reply from %s within the round (timeout %ss or failure); "
                "the round goes on without them",
                rnd,
                phase,
                ", ".join(missing),
                f"{self.timeout:g}" if self.timeout else "-",
            )
            dropped = self.recorder.round_metrics.get(rnd, {}).get("dropped", [])
            self.recorder.metrics(rnd, dropped=sorted(set(dropped) | set(missing)))

    def drop_errors(self, replies: Iterable[Message], phase: str) -> list[Message]:
        """Replies without errors; each error reply is logged with its silo."""
        valid = []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "%s: dropped reply from %s: %s", phase, self.silo_of(reply), reply.error.reason
                )
            else:
                valid.append(reply)
        return valid

    def record_evaluation(self, rnd: int, reply: Message) -> None:
        """Record an evaluation reply's accuracy and loss, its timing and the target's
        accuracies after test-time adaptation (a malformed reply is logged)."""
        domain = self.silo_of(reply)
        metrics = reply.content.metric_records.get(METRICS, {})
        if not all(isinstance(metrics.get(k), float | int) for k in ("test-accuracy", "test-loss")):
            log.warning("round %d: evaluation reply from %s lacks its metrics", rnd, domain)
            return
        keys = ("test-accuracy", "test-loss", *TIMING_KEYS, *TTA_KEYS)
        values = {k: metrics[k] for k in keys if k in metrics}
        self.recorder.silo(rnd, domain, values)

    def record_training(self, rnd: int, reply: Message) -> None:
        """Record a valid train reply: the received model's test metrics under round
        ``rnd - 1`` (whose model it is), the local update's metrics under ``rnd``."""
        domain = self.silo_of(reply)
        metrics = reply.content[METRICS]
        accuracy, loss = (metrics[key] for key in RECEIVED_KEYS)
        self.recorder.silo(rnd - 1, domain, {"test-accuracy": accuracy, "test-loss": loss})
        own = {k: v for k, v in metrics.items() if k not in RECEIVED_KEYS}
        self.recorder.silo(rnd, domain, own)


def _bytes(grid: Grid) -> tuple[int, int] | None:
    """The grid's byte counters (sent, received), or None for a grid that does not meter."""
    sent, received = getattr(grid, "bytes_sent", None), getattr(grid, "bytes_received", None)
    return None if sent is None or received is None else (sent, received)
