"""FedAvg over domain silos, with evaluation folded into the training phase.

Each round is ONE message phase: source silos get ``train`` (they first evaluate the received
global model on their own test split, then train), and the target silo gets ``evaluate`` with
the same global model. So round r's phase reports the accuracy of the model after round r-1;
the model after the last round is evaluated by one final ``evaluate`` phase to every silo.
Flower's FedAvg pattern would spend two phases per round (train, then evaluate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedalign.config import Silo
from fedalign.errors import FederationError
from fedalign.runlog import RunRecorder
from server.grid import MeteredGrid
from strategies.utils import ARRAYS, CONFIG, METRICS

log = logging.getLogger("fedalign.strategy")


class SiloFedAvg(FedAvg):
    """FedAvg whose sources train and whose target silo only evaluates.

    Parameters
    ----------
    roster : dict[int, Silo]
        Node ID -> silo (domain, role), from discovery.
    recorder : RunRecorder
        Receives every silo's metrics and writes the run folder.
    num_rounds : int
        Total rounds; the last round adds the final evaluation phase.
        After ``start()``, ``final_arrays`` holds the final global model (also when no
        round could aggregate, where Flower's ``Result.arrays`` stays empty).
    min_sources : int (default: 1)
        Minimum valid source replies needed to aggregate a round.
    """

    def __init__(
        self,
        roster: dict[int, Silo],
        recorder: RunRecorder,
        num_rounds: int,
        min_sources: int = 1,
    ) -> None:
        sources = [n for n, s in roster.items() if s.role == "source"]
        super().__init__(
            min_train_nodes=len(sources),
            min_evaluate_nodes=len(roster),
            min_available_nodes=len(roster),
        )
        self.roster = roster
        self.recorder = recorder
        self.num_rounds = num_rounds
        self.min_sources = min_sources
        self._phase_start = 0.0
        self._bytes_mark = (0, 0)
        self._grid: Grid | None = None
        self.final_arrays: ArrayRecord | None = None

    # Roster helpers ----------------------------------------------------------------------
    def nodes(self, role: str) -> list[int]:
        return sorted(n for n, s in self.roster.items() if s.role == role)

    def domain(self, node_id: int) -> str:
        silo = self.roster.get(node_id)
        return silo.domain if silo else f"node {node_id}"

    def _messages(
        self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> list[Message]:
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(record, node, message_type) for node in nodes]

    def _start_phase(self, grid: Grid) -> None:
        self._phase_start = time.perf_counter()
        if isinstance(grid, MeteredGrid):
            self._bytes_mark = (grid.bytes_sent, grid.bytes_received)
        self._grid = grid

    def _end_phase(self, rnd: int) -> None:
        values = {"wall_seconds": time.perf_counter() - self._phase_start}
        grid = self._grid
        if isinstance(grid, MeteredGrid):
            values["bytes_sent"] = grid.bytes_sent - self._bytes_mark[0]
            values["bytes_received"] = grid.bytes_received - self._bytes_mark[1]
        self.recorder.info(rnd, **values)

    def _split_errors(self, replies: Iterable[Message], phase: str) -> list[Message]:
        valid = []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "%s: dropped reply from %s: %s",
                    phase,
                    self.domain(reply.metadata.src_node_id),
                    reply.error.reason,
                )
            else:
                valid.append(reply)
        return valid

    # Train phase: sources train on model r-1, targets evaluate model r-1 --------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start_phase(grid)
        connected = set(grid.get_node_ids())
        sources = [n for n in self.nodes("source") if n in connected]
        if len(sources) < self.min_sources:
            raise FederationError(
                f"round {server_round}: {len(sources)} source silo(s) connected, "
                f"strategy.min_sources={self.min_sources}"
            )
        config = ConfigRecord({**config, "server-round": server_round})
        targets = [n for n in self.nodes("target") if n in connected]
        log.info(
            "round %d/%d: training on %s",
            server_round,
            self.num_rounds,
            ", ".join(self.domain(n) for n in sources),
        )
        return self._messages(sources, arrays, config, MessageType.TRAIN) + self._messages(
            targets, arrays, config, MessageType.EVALUATE
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._split_errors(replies, f"round {server_round} train")
        trained = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
        for reply in replies:
            domain, metrics = self.domain(reply.metadata.src_node_id), reply.content[METRICS]
            if reply.metadata.message_type == MessageType.TRAIN:
                self.recorder.silo(
                    server_round - 1,
                    domain,
                    {
                        "test-accuracy": metrics["received-test-accuracy"],
                        "test-loss": metrics["received-test-loss"],
                    },
                )
                self.recorder.silo(
                    server_round,
                    domain,
                    {k: metrics[k] for k in ("train-loss", "train-accuracy", "train-seconds")},
                )
            else:
                self.recorder.silo(
                    server_round - 1,
                    domain,
                    {
                        "test-accuracy": metrics["test-accuracy"],
                        "test-loss": metrics["test-loss"],
                    },
                )
        self.recorder.complete(server_round - 1)
        if len(trained) < self.min_sources:
            log.warning(
                "round %d: %d valid source replies < strategy.min_sources=%d; "
                "the global model is kept unchanged",
                server_round,
                len(trained),
                self.min_sources,
            )
            self._end_phase(server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, trained)
        self._end_phase(server_round)
        return arrays, metrics

    # Evaluate phase: only after the last round, every silo evaluates the final model ------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round < self.num_rounds:
            return []
        self.final_arrays = arrays
        self._start_phase(grid)
        config = ConfigRecord({**config, "server-round": server_round})
        connected = set(grid.get_node_ids())
        nodes = [n for n in sorted(self.roster) if n in connected]
        return self._messages(nodes, arrays, config, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = self._split_errors(replies, f"round {server_round} evaluate")
        if server_round < self.num_rounds:
            return None
        for reply in replies:
            metrics = reply.content[METRICS]
            self.recorder.silo(
                server_round,
                self.domain(reply.metadata.src_node_id),
                {
                    "test-accuracy": metrics["test-accuracy"],
                    "test-loss": metrics["test-loss"],
                },
            )
        self._end_phase(server_round)
        self.recorder.complete(server_round)
        return super().aggregate_evaluate(server_round, replies) if replies else None
