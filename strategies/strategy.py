"""The round loop every fedalign strategy runs, with each phase of a round a visible step.

A run is: ``before_rounds`` (phase 0), then per round ``rejoin`` (a restarted silo's new node
is taken back), ``train_phase``, ``target_phase`` and ``evaluate_phase``, then
``on_round_end`` (the ServerApp's checkpoint); after the last round ``final_phase`` evaluates
the final model. A subclass fills in the phases it has: FedAvg folds evaluation into the train
phase, Flower's stock pattern has an evaluate phase, FedKA has a target phase.

The strategy is given its collaborators: the ``Roster`` (who the silos are), the
``RoundRecorder`` (what the run record keeps, and what each phase cost), the
``ReplyValidator`` (which train replies may be aggregated) and an ``Aggregator``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedalign.protocol import ARRAYS, CONFIG, to_record
from fedalign.runlog import RunRecorder
from fedalign.settings.fedavg import FedAvgSettings
from strategies.recording import RoundRecorder
from strategies.roster import Roster
from strategies.validation import ReplyValidator

log = logging.getLogger("fedalign.strategy")


class Aggregator(Protocol):
    """Combines validated train replies (sorted by silo) into the new global model and metrics.

    ``WeightedAverage`` (FedAvg), ``RobustAggregator`` and ``FisherAggregator`` are the three.
    """

    def __call__(
        self, server_round: int, replies: list[Message], domains: list[str]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...


class SiloStrategy(Strategy):
    """The round loop over domain silos; subclasses configure and aggregate the phases.

    Parameters
    ----------
    settings : FedAvgSettings
        The strategy's settings (``fedalign.settings``).
    num_rounds : int
        Total rounds. After ``start()``, ``final_arrays`` holds the final global model.
    roster : Roster
        The silos.
    rounds : RoundRecorder
        Records every phase.
    validator : ReplyValidator
        Checks train replies before aggregation.
    aggregator : Aggregator
        Combines the valid train replies.
    """

    # Strategy attributes (ArrayRecords) a checkpoint keeps, by group name.
    CHECKPOINTED: ClassVar[dict[str, str]] = {"final": "final_arrays"}

    def __init__(
        self,
        settings: FedAvgSettings,
        num_rounds: int,
        roster: Roster,
        rounds: RoundRecorder,
        validator: ReplyValidator,
        aggregator: Aggregator,
    ) -> None:
        self.settings = settings
        self.num_rounds = num_rounds
        self.roster = roster
        self.rounds = rounds
        self.validator = validator
        self.aggregator = aggregator
        self.final_arrays: ArrayRecord | None = None
        self.timeout: float | None = None
        self.train_config = ConfigRecord()
        self.evaluate_config = ConfigRecord()
        self.first_round = 1
        self.on_round_end: Callable[[int, ArrayRecord], None] | None = None

    @property
    def recorder(self) -> RunRecorder:
        """The run's :class:`fedalign.runlog.RunRecorder`."""
        return self.rounds.recorder

    def messages(self, nodes: list[int], content: RecordDict, message_type: str) -> list[Message]:
        """One message of ``message_type`` with ``content`` for each node."""
        return [Message(content, node, message_type) for node in nodes]

    # The loop ------------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
    ) -> Result:
        """Run rounds ``first_round`` .. ``num_rounds``, then the final evaluation.

        Flower's own ``Strategy.start`` always begins at round 1; this loop has a first round,
        so that a run resumed from a checkpoint continues where it was. After every round
        ``on_round_end(round, arrays)`` is called (the ServerApp writes its checkpoint there).
        """
        self.final_arrays = self.final_arrays or initial_arrays
        self.timeout = self.rounds.timeout = timeout
        self.train_config = train_config or ConfigRecord()
        self.evaluate_config = evaluate_config or ConfigRecord()
        if self.first_round == 1:
            self.before_rounds(grid, initial_arrays)
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for rnd in range(self.first_round, num_rounds + 1):
            aggregated, metrics = self.train_phase(rnd, arrays, grid)
            if aggregated is not None:
                arrays = result.arrays = aggregated
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            self.target_phase(rnd, grid)
            self.evaluate_phase(rnd, arrays, grid)
            if self.on_round_end is not None:
                self.on_round_end(rnd, arrays)
        self.final_phase(grid)
        return result

    def before_rounds(self, grid: Grid, initial_arrays: ArrayRecord) -> None:
        """Work before round 1 (FedKA asks the target silo for embeddings); none here."""

    def train_phase(
        self, rnd: int, arrays: ArrayRecord, grid: Grid
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take back restarted silos, send ``configure_train``'s messages, aggregate."""
        with self.rounds.phase(grid, rnd):
            self.roster.rejoin(grid, self.train_config)
            messages = list(self.configure_train(rnd, arrays, self.train_config, grid))
            replies = grid.send_and_receive(self.rounds.expect(messages), timeout=self.timeout)
            return self.aggregate_train(rnd, replies)

    def target_phase(self, rnd: int, grid: Grid) -> None:
        """Work for the target silo after the train phase (FedKA's vote); none here."""

    def evaluate_phase(self, rnd: int, arrays: ArrayRecord, grid: Grid) -> None:
        """Send ``configure_evaluate``'s messages, if any, and aggregate their replies."""
        messages = list(self.configure_evaluate(rnd, arrays, self.evaluate_config, grid))
        if not messages:
            return
        with self.rounds.phase(grid, rnd):
            replies = grid.send_and_receive(self.rounds.expect(messages), timeout=self.timeout)
            self.aggregate_evaluate(rnd, replies)

    def final_evaluation_nodes(self, grid: Grid) -> list[int]:
        """Silos that still have to evaluate the final model: all of them here."""
        return self.roster.nodes("source", grid) + self.roster.nodes("target", grid)

    def final_phase(self, grid: Grid) -> None:
        """One ``evaluate`` phase with the final model; completes the last round's line."""
        with self.rounds.phase(grid, self.num_rounds):
            config = ConfigRecord(
                {**self.evaluate_config, "server-round": self.num_rounds, "run-complete": True}
            )
            content = RecordDict({ARRAYS: self.final_arrays, CONFIG: config})
            nodes = self.final_evaluation_nodes(grid)
            messages = self.rounds.expect(self.messages(nodes, content, MessageType.EVALUATE))
            replies = list(grid.send_and_receive(messages, timeout=self.timeout))
            self.rounds.record_missing(self.num_rounds, replies, "final evaluation")
            for reply in self.rounds.drop_errors(replies, "final evaluation"):
                self.rounds.record_evaluation(self.num_rounds, reply)
        self.recorder.complete(self.num_rounds)

    # Flower's phase methods: no evaluate phase unless a subclass configures one -------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("%s, %d rounds, settings %s", type(self).__name__, self.num_rounds, self.settings)

    # Checkpoints ---------------------------------------------------------------------------
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
