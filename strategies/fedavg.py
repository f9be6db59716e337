"""FedAvg over domain silos, with evaluation folded into the training phase.

Each round is ONE message phase: source silos get ``train`` (they first evaluate the received
global model on their own test split, then train), and the target silo gets ``evaluate`` with
the same global model. So round r's phase reports the accuracy of the model after round r-1;
the model after the last round is evaluated by one final ``evaluate`` phase. Flower's FedAvg
pattern would spend two phases per round (train, then evaluate; ``fedavg_stock``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedalign.errors import FederationError
from fedalign.protocol import ARRAYS, CONFIG
from strategies.strategy import SiloStrategy

log = logging.getLogger("fedalign.strategy")


class WeightedAverage:
    """FedAvg's average of the replies' weights and metrics (Flower's), by example count or by
    another metric every reply carries (``weighted_by``; FedDG-GA's ``ga-weight``)."""

    def __init__(self, weighted_by: str = "num-examples") -> None:
        self.fedavg = FedAvg(weighted_by_key=weighted_by)

    def __call__(
        self, server_round: int, replies: list[Message], domains: list[str]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.fedavg.aggregate_train(server_round, replies)


class SiloFedAvg(SiloStrategy):
    """FedAvg whose sources train and whose target silo only evaluates.

    Parameters are those of :class:`strategies.strategy.SiloStrategy`. Every train reply is
    checked by the validator before aggregation; a reply that fails is left out with a log line
    naming its silo. A round with fewer than ``settings.min_sources`` valid replies keeps the
    global model.
    """

    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        """What every source receives with ``train``."""
        return RecordDict({ARRAYS: arrays, CONFIG: config})

    def evaluating_while_training(self, grid: Grid) -> list[int]:
        """Silos that evaluate the global model during the train phase: the target."""
        return self.roster.nodes("target", grid)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sources = self.roster.nodes("source", grid)
        if len(sources) < self.settings.min_sources:
            raise FederationError(
                f"round {server_round}: {len(sources)} source silo(s) connected, "
                f"strategy.min_sources={self.settings.min_sources}"
            )
        self.validator.expect(arrays)
        config = ConfigRecord({**config, **self.settings.to_wire(), "server-round": server_round})
        log.info(
            "round %d/%d: training on %s",
            server_round,
            self.num_rounds,
            ", ".join(self.roster.domain(n) for n in sources)
            if len(sources) <= 12
            else f"{len(sources)} source silos",
        )
        content = self.train_content(server_round, arrays, config)
        evaluate = RecordDict({ARRAYS: arrays, CONFIG: config})
        return self.messages(sources, content, MessageType.TRAIN) + self.messages(
            self.evaluating_while_training(grid), evaluate, MessageType.EVALUATE
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rounds = self.rounds
        replies = list(replies)
        rounds.record_missing(server_round, replies, "train")
        trained = []
        for reply in rounds.drop_errors(replies, f"round {server_round} train"):
            if reply.metadata.message_type != MessageType.TRAIN:
                rounds.record_evaluation(server_round - 1, reply)
            elif problem := self.validator.problem(reply):
                domain = rounds.silo_of(reply)
                log.warning("round %d: dropped reply from %s: %s", server_round, domain, problem)
            else:
                trained.append(reply)
                rounds.record_training(server_round, reply)
        self.recorder.complete(server_round - 1)
        # Replies arrive in any order; a fixed order makes the float sums reproducible.
        trained.sort(key=rounds.silo_of)
        self.trained(server_round, trained)
        if len(trained) < self.settings.min_sources:
            log.warning(
                "round %d: %d valid source replies < strategy.min_sources=%d; "
                "the global model is kept unchanged",
                server_round,
                len(trained),
                self.settings.min_sources,
            )
            return None, None
        domains = [rounds.silo_of(r) for r in trained]
        arrays, metrics = self.aggregator(server_round, trained, domains)
        if arrays is not None:
            self.final_arrays = arrays
        return arrays, metrics

    def trained(self, server_round: int, replies: list[Message]) -> None:
        """A hook for the round's valid train replies, sorted by silo (FedKA keeps them)."""
