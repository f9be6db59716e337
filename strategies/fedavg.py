"""FedAvg over domain silos, with evaluation folded into the training phase.

Each round is ONE message phase: source silos get ``train`` (they first evaluate the received
global model on their own test split, then train), and the target silo gets ``evaluate`` with
the same global model. So round r's phase reports the accuracy of the model after round r-1;
the model after the last round is evaluated by one final ``evaluate`` phase. Flower's FedAvg
pattern would spend two phases per round (train, then evaluate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedalign.config import Silo
from fedalign.errors import FederationError
from fedalign.runlog import RunRecorder
from server.grid import MeteredGrid
from strategies.utils import ARRAYS, CONFIG, INFO, METRICS, SILO, to_record

log = logging.getLogger("fedalign.strategy")

# Train metrics that describe the received model, not the local update.
RECEIVED_KEYS = ("received-test-accuracy", "received-test-loss")
# Every reply's timing (client/app.py): the silo's work and its ClientApp process's start-up.
TIMING_KEYS = ("handler-seconds", "start-seconds", "import-seconds")

# Combines validated train replies (sorted by silo) into the new global model and metrics;
# ``client_config`` lists config keys every source must receive (e.g. to send a Fisher).
Aggregator = Callable[
    [int, list[Message], list[str]], tuple[ArrayRecord | None, MetricRecord | None]
]


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 distance between ``arrays`` and ``reference`` over all their float arrays."""
    total = 0.0
    for name, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            diff = values.astype(np.float64) - reference[name]
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return total**0.5


class SiloFedAvg(FedAvg):
    """FedAvg whose sources train and whose target silo only evaluates.

    Parameters
    ----------
    roster : dict[int, Silo]
        Node ID -> silo (domain, role), from discovery.
    recorder : RunRecorder
        Receives every silo's metrics and writes the run folder.
    num_rounds : int
        Total rounds. After ``start()``, ``final_arrays`` holds the final global model (also
        when no round could aggregate, where Flower's ``Result.arrays`` stays empty).
    min_sources : int (default: 1)
        Minimum valid source replies needed to aggregate a round.
    aggregator : Aggregator, optional
        Replaces FedAvg's weighted average (e.g. ``FisherAggregator``, ``RobustAggregator``).

    Every train reply is checked before aggregation (``train_reply_problem``): its records,
    array names, shapes and dtypes against the global model, finite values, and, when the
    attribute ``max_update_norm`` is set (``updates.max_norm``), the L2 distance of its weights
    from the global model. A reply that fails is left out with a log line naming its silo.
    """

    def __init__(
        self,
        roster: dict[int, Silo],
        recorder: RunRecorder,
        num_rounds: int,
        min_sources: int = 1,
        aggregator: Aggregator | None = None,
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
        self.aggregator = aggregator
        self.client_config: dict[str, bool | int | float | str] = {}  # added to train configs
        self.final_arrays: ArrayRecord | None = None
        self.source_models: dict[str, ArrayRecord] = {}
        self.timeout: float | None = None
        self.train_config = ConfigRecord()
        self.evaluate_config = ConfigRecord()
        self.max_update_norm: float | None = None
        self.first_round = 1
        self.on_round_end: Callable[[int, ArrayRecord], None] | None = None
        self._sent: dict[str, tuple[tuple[int, ...], str]] = {}
        self._global: dict[str, np.ndarray] = {}
        self._expected: set[str] = set()
        self._strangers: set[int] = set()
        self._phase_start = 0.0
        self._bytes_mark = (0, 0)
        self._grid: Grid | None = None

    # Roster and bookkeeping --------------------------------------------------------------
    def nodes(self, role: str, grid: Grid | None = None) -> list[int]:
        """Node IDs of ``role``, restricted to connected nodes when ``grid`` is given."""
        connected = set(grid.get_node_ids()) if grid is not None else set(self.roster)
        return sorted(n for n, s in self.roster.items() if s.role == role and n in connected)

    def domain(self, node_id: int) -> str:
        silo = self.roster.get(node_id)
        return silo.domain if silo else f"node {node_id}"

    def silo_of(self, reply: Message) -> str:
        """The domain a reply answers for (also for errors the SuperLink sends on its behalf)."""
        grid = self._grid
        node = grid.replier(reply) if isinstance(grid, MeteredGrid) else reply.metadata.src_node_id
        return self.domain(node)

    def expect(self, messages: list[Message]) -> list[Message]:
        """Remember which silos a phase waits for, to name the ones that never answer."""
        self._expected = {self.domain(m.metadata.dst_node_id) for m in messages}
        return messages

    def record_missing(self, rnd: int, replies: list[Message], phase: str) -> None:
        """Log and record silos that sent no usable reply (``dropped`` in the round's metrics)
        and configured silos no longer connected, so never asked (``absent``)."""
        answered = {self.silo_of(r) for r in replies if not r.has_error()}
        missing = sorted(self._expected - answered)
        if self._grid is not None:
            connected = set(self._grid.get_node_ids())
            gone = {s.domain for n, s in self.roster.items() if n not in connected}
            absent = gone - self._expected - answered
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

    @staticmethod
    def messages(nodes: list[int], content: RecordDict, message_type: str) -> list[Message]:
        return [Message(content, node, message_type) for node in nodes]

    def start_phase(self, grid: Grid) -> None:
        self._phase_start = time.perf_counter()
        self._grid = grid
        if isinstance(grid, MeteredGrid):
            self._bytes_mark = (grid.bytes_sent, grid.bytes_received)

    def end_phase(self, rnd: int) -> None:
        """Add the phase's wall seconds and bytes to round ``rnd``."""
        values = {"wall_seconds": time.perf_counter() - self._phase_start}
        if isinstance(self._grid, MeteredGrid):
            values["bytes_sent"] = self._grid.bytes_sent - self._bytes_mark[0]
            values["bytes_received"] = self._grid.bytes_received - self._bytes_mark[1]
        self.recorder.info(rnd, **values)

    def drop_errors(self, replies: Iterable[Message], phase: str) -> list[Message]:
        """Replies without errors; each error reply is logged with its silo."""
        valid = []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "%s: dropped reply from %s: %s",
                    phase,
                    self.silo_of(reply),
                    reply.error.reason,
                )
            else:
                valid.append(reply)
        return valid

    def train_reply_problem(self, reply: Message) -> str | None:
        """Why a train reply cannot be aggregated, or None when it can."""
        content = reply.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return f"missing records (has {sorted(content.keys())})"
        arrays = content[ARRAYS]
        if set(arrays) != set(self._sent):
            return f"arrays {sorted(set(arrays) ^ set(self._sent))[:3]} do not match the model"
        for name, array in arrays.items():
            if (tuple(array.shape), array.dtype) != self._sent[name]:
                return f"array '{name}' is {array.dtype}{list(array.shape)}, expected " + (
                    f"{self._sent[name][1]}{list(self._sent[name][0])}"
                )
            if not np.isfinite(array.numpy()).all():
                return f"array '{name}' has non-finite values"
        if self.max_update_norm is not None:
            norm = update_norm(arrays, self._global)
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds updates.max_norm={self.max_update_norm:g}"
        metrics = content[METRICS]
        if not metrics.get("num-examples", 0) > 0:
            return "metrics lack a positive num-examples"
        if any(key not in metrics for key in RECEIVED_KEYS):
            return f"metrics lack {', '.join(RECEIVED_KEYS)}"
        return None

    def rejoin(self, grid: Grid) -> None:
        """Take back a silo whose SuperNode restarted: Flower gives it a new node ID, so ask
        every unknown node who it is and let a configured silo replace its old node."""
        new = sorted(set(grid.get_node_ids()) - set(self.roster) - self._strangers)
        if not new:
            return
        content = RecordDict({CONFIG: self.train_config})
        replies = grid.send_and_receive(self.messages(new, content, INFO), timeout=60)
        expected = {s.domain: s.role for s in self.roster.values()}
        for reply in replies:
            node = reply.metadata.src_node_id
            silo = None if reply.has_error() else reply.content.config_records.get(SILO)
            if silo is None or expected.get(str(silo["domain"])) != str(silo["role"]):
                self._strangers.add(node)
                log.warning("node %d is not a silo of this run; it is ignored", node)
                continue
            domain = str(silo["domain"])
            for old in [n for n, s in self.roster.items() if s.domain == domain]:
                del self.roster[old]
            self.roster[node] = Silo(domain, str(silo["role"]))
            log.info("silo %s rejoined on node %d", domain, node)

    # Flower's loop ------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: object = None,
    ) -> Result:
        """Flower's round loop (train phase, evaluate phase per round) from round
        ``first_round`` on, then one evaluation of the final model (see module doc).

        Flower's own ``Strategy.start`` always begins at round 1; this loop is the same one
        with a first round, so that a run resumed from a checkpoint continues where it was.
        After every round ``on_round_end(round, arrays)`` is called (the ServerApp writes its
        checkpoint there).
        """
        self.final_arrays = self.final_arrays or initial_arrays
        self.timeout = timeout
        self.train_config = train_config or ConfigRecord()
        self.evaluate_config = evaluate_config or ConfigRecord()
        if self.first_round == 1:
            self.before_rounds(grid, initial_arrays)
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for rnd in range(self.first_round, num_rounds + 1):
            replies = grid.send_and_receive(
                self.configure_train(rnd, arrays, self.train_config, grid), timeout=timeout
            )
            aggregated, metrics = self.aggregate_train(rnd, replies)
            if aggregated is not None:
                arrays = result.arrays = aggregated
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            replies = grid.send_and_receive(
                self.configure_evaluate(rnd, arrays, self.evaluate_config, grid), timeout=timeout
            )
            self.aggregate_evaluate(rnd, replies)
            if self.on_round_end is not None:
                self.on_round_end(rnd, arrays)
        self.evaluate_final(grid)
        return result

    # Checkpoints -------------------------------------------------------------------------
    # Strategy attributes (ArrayRecords) a checkpoint keeps, by group name.
    CHECKPOINTED: ClassVar[dict[str, str]] = {"final": "final_arrays"}

    def checkpoint_groups(self) -> dict[str, dict[str, np.ndarray]]:
        """The strategy's state as named groups of arrays (None attributes are left out)."""
        groups = {}
        for group, attribute in self.CHECKPOINTED.items():
            record = getattr(self, attribute)
            if record is not None:
                groups[group] = {k: a.numpy() for k, a in record.items()}
        return groups

    def restore(self, first_round: int, groups: dict[str, dict[str, np.ndarray]]) -> None:
        """Continue at ``first_round`` with the state of ``checkpoint_groups``."""
        self.first_round = first_round
        for group, attribute in self.CHECKPOINTED.items():
            setattr(self, attribute, to_record(groups[group]) if group in groups else None)

    def before_rounds(self, grid: Grid, initial_arrays: ArrayRecord) -> None:
        """A hook for work before round 1 (FedKA asks the target silo for embeddings)."""

    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        """What every source receives with ``train``."""
        return RecordDict({ARRAYS: arrays, CONFIG: config})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.start_phase(grid)
        self.rejoin(grid)
        sources = self.nodes("source", grid)
        if len(sources) < self.min_sources:
            raise FederationError(
                f"round {server_round}: {len(sources)} source silo(s) connected, "
                f"strategy.min_sources={self.min_sources}"
            )
        self._sent = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._global = {k: a.numpy() for k, a in arrays.items()} if self.max_update_norm else {}
        extra = {**self.client_config, **getattr(self.aggregator, "client_config", {})}
        config = ConfigRecord({**config, **extra, "server-round": server_round})
        log.info(
            "round %d/%d: training on %s",
            server_round,
            self.num_rounds,
            ", ".join(self.domain(n) for n in sources)
            if len(sources) <= 12
            else f"{len(sources)} source silos",
        )
        return self.expect(
            self.messages(
                sources, self.train_content(server_round, arrays, config), MessageType.TRAIN
            )
            + self.messages(
                self.nodes("target", grid),
                RecordDict({ARRAYS: arrays, CONFIG: config}),
                MessageType.EVALUATE,
            )
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.record_missing(server_round, replies, "train")
        replies = self.drop_errors(replies, f"round {server_round} train")
        trained = []
        for reply in replies:
            domain = self.silo_of(reply)
            if reply.metadata.message_type != MessageType.TRAIN:
                self.record_evaluation(server_round - 1, reply)
            elif problem := self.train_reply_problem(reply):
                log.warning("round %d: dropped reply from %s: %s", server_round, domain, problem)
            else:
                trained.append(reply)
                metrics = reply.content[METRICS]
                self.recorder.silo(
                    server_round - 1,
                    domain,
                    {
                        "test-accuracy": metrics[RECEIVED_KEYS[0]],
                        "test-loss": metrics[RECEIVED_KEYS[1]],
                    },
                )
                self.recorder.silo(
                    server_round,
                    domain,
                    {k: v for k, v in metrics.items() if k not in RECEIVED_KEYS},
                )
        self.recorder.complete(server_round - 1)
        # Replies arrive in any order; a fixed order makes the float sums reproducible.
        trained.sort(key=lambda reply: self.silo_of(reply))
        self.source_models = {self.silo_of(r): r.content[ARRAYS] for r in trained}
        if len(trained) < self.min_sources:
            log.warning(
                "round %d: %d valid source replies < strategy.min_sources=%d; "
                "the global model is kept unchanged",
                server_round,
                len(trained),
                self.min_sources,
            )
            self.end_phase(server_round)
            return None, None
        if self.aggregator is None:
            arrays, metrics = super().aggregate_train(server_round, trained)
        else:
            domains = [self.silo_of(r) for r in trained]
            arrays, metrics = self.aggregator(server_round, trained, domains)
        if arrays is not None:
            self.final_arrays = arrays
        self.end_phase(server_round)
        return arrays, metrics

    def record_evaluation(self, rnd: int, reply: Message) -> None:
        """Record an evaluation reply's accuracy and loss (a malformed one is logged)."""
        domain = self.silo_of(reply)
        metrics = reply.content.metric_records.get(METRICS, {})
        if not all(isinstance(metrics.get(k), float | int) for k in ("test-accuracy", "test-loss")):
            log.warning("round %d: evaluation reply from %s lacks its metrics", rnd, domain)
            return
        keys = ("test-accuracy", "test-loss", *TIMING_KEYS)
        values = {k: metrics[k] for k in keys if k in metrics}
        self.recorder.silo(rnd, domain, values)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # folded into the train phase; see evaluate_final

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # After the last round ----------------------------------------------------------------
    def final_evaluation_nodes(self, grid: Grid) -> list[int]:
        """Silos that still have to evaluate the final model."""
        return self.nodes("source", grid) + self.nodes("target", grid)

    def evaluate_final(self, grid: Grid) -> None:
        """One ``evaluate`` phase with the final model; completes the last round's line."""
        self.start_phase(grid)
        config = ConfigRecord(
            {**self.evaluate_config, "server-round": self.num_rounds, "run-complete": True}
        )
        content = RecordDict({ARRAYS: self.final_arrays, CONFIG: config})
        messages = self.messages(self.final_evaluation_nodes(grid), content, MessageType.EVALUATE)
        replies = list(grid.send_and_receive(self.expect(messages), timeout=self.timeout))
        self.record_missing(self.num_rounds, replies, "final evaluation")
        for reply in self.drop_errors(replies, "final evaluation"):
            self.record_evaluation(self.num_rounds, reply)
        self.end_phase(self.num_rounds)
        self.recorder.complete(self.num_rounds)
