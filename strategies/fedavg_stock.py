"""Flower's stock FedAvg round pattern: a train phase, then an evaluate phase, every round.

The reference that ``bench/bench_overhead.py`` measures fedalign's one-phase rounds against
(``strategy=fedavg_stock``, with ``federation.reply_poll_min=3 federation.reply_poll_max=3
federation.superexec_poll=null`` for Flower's own polling). Same learning as ``fedavg``: the
sources train on the global model and the server averages them; then every silo evaluates the
new model in a second phase, as ``flwr.serverapp.strategy.FedAvg.start`` does.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedalign.protocol import ARRAYS, CONFIG
from strategies.fedavg import SiloFedAvg


class StockFedAvg(SiloFedAvg):
    """FedAvg with evaluation in its own phase (two phases per round).

    Parameters are those of :class:`strategies.strategy.SiloStrategy`.
    """

    def evaluating_while_training(self, grid: Grid) -> list[int]:
        return []  # everyone evaluates in the evaluate phase

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        last = server_round == self.num_rounds  # silos then drop their between-round state
        config = ConfigRecord({**config, "server-round": server_round, "run-complete": last})
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        nodes = self.roster.nodes("source", grid) + self.roster.nodes("target", grid)
        return self.messages(nodes, content, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self.rounds.record_missing(server_round, replies, "evaluate")
        for reply in self.rounds.drop_errors(replies, f"round {server_round} evaluate"):
            self.rounds.record_evaluation(server_round, reply)
        return None

    def final_evaluation_nodes(self, grid: Grid) -> list[int]:
        return []  # the last round's evaluate phase already evaluated the final model
