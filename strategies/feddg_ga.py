"""FedDG-GA (Zhang et al., CVPR 2023): ``strategy=feddg_ga``.

FedAvg's rounds whose average weighs each source by a weight that follows its generalization
gap (``fedalign.generalization``) instead of its example count. A source's ``train`` reply
already carries the received model's loss and accuracy on its test split; FedDG-GA's sources add
their trained model's (``trained-test-loss``, ``trained-test-accuracy``). The gap of round r's
aggregate on silo i is therefore read from two replies: silo i's ``received-test-*`` of round
r + 1 (the aggregate) against its ``trained-test-*`` of round r (its local model, averaged into
the aggregate). So round r + 1 averages with the weights adjusted by round r's gaps, as in the
official code; round 1 averages uniformly.

The weights and the last round's local metrics are strategy state (checkpoint group ``ga``);
every round's line in metrics.jsonl has ``ga_weights`` (the weights of all sources that round's
average used, before renormalising over the silos that replied) and ``ga_gaps``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message

from fedalign.generalization import adjust_weights, generalization_gap, step_size, weights_of
from fedalign.protocol import METRICS, TRAINED_ACCURACY, TRAINED_LOSS, from_record, to_record
from fedalign.settings.feddg_ga import FedDGGASettings
from strategies.fedavg import SiloFedAvg
from strategies.strategy import SiloStrategy

GA_WEIGHT = "ga-weight"  # set by the server on each valid reply: its weight in the average
# gap metric -> (the aggregate's value, the local model's value) in a train reply's metrics
GAP_KEYS = {
    "loss": ("received-test-loss", TRAINED_LOSS),
    "accuracy": ("received-test-accuracy", TRAINED_ACCURACY),
}


class FedDGGA(SiloFedAvg):
    """FedAvg with generalization-adjusted aggregation weights.

    Parameters are those of :class:`strategies.strategy.SiloStrategy`, with ``settings`` a
    :class:`fedalign.settings.feddg_ga.FedDGGASettings` and the aggregator a weighted average by
    ``GA_WEIGHT`` (``strategies.registry``).
    """

    settings: FedDGGASettings

    CHECKPOINTED: ClassVar[dict[str, str]] = {**SiloStrategy.CHECKPOINTED, "ga": "ga_state"}
    ga_state: ArrayRecord | None = None  # "weight.<silo>" and "local.<silo>", one value each

    def trained(self, server_round: int, replies: list[Message]) -> None:
        """Adjust the weights by the previous round's gaps and give each reply its weight."""
        super().trained(server_round, replies)
        weights, local = self.state()
        aggregate_key, local_key = GAP_KEYS[self.settings.gap_metric]
        domains = [self.rounds.silo_of(r) for r in replies]
        metrics = [r.content[METRICS] for r in replies]
        gaps = {
            domain: generalization_gap(
                float(m[aggregate_key]), local[domain], self.settings.gap_metric
            )
            for domain, m in zip(domains, metrics, strict=True)
            if domain in local
        }
        if gaps:  # local metrics exist only from the previous round, so server_round >= 2
            step = step_size(
                self.settings.step_size,
                server_round - 1,
                self.num_rounds,
                self.settings.step_schedule,
            )
            weights = adjust_weights(weights, gaps, step)
        for m, weight in zip(metrics, weights_of(weights, domains), strict=True):
            m[GA_WEIGHT] = weight
        # The next round's gaps compare with these local models only if they are averaged now.
        averaged = len(replies) >= self.settings.min_sources
        local = {
            domain: float(m[local_key])
            for domain, m in zip(domains, metrics, strict=True)
            if averaged and local_key in m
        }
        self.ga_state = pack(weights, local)
        self.recorder.metrics(server_round, ga_weights=weights, ga_gaps=gaps)

    def state(self) -> tuple[dict[str, float], dict[str, float]]:
        """The sources' weights (uniform before round 1) and their last local metrics."""
        if self.ga_state is None:
            sources = sorted(self.roster.domains("source"))
            return {d: 1.0 / len(sources) for d in sources}, {}
        return unpack(self.ga_state)


def pack(weights: dict[str, float], local: dict[str, float]) -> ArrayRecord:
    """The state as one array per value (a checkpoint holds arrays)."""
    values = {f"weight.{d}": w for d, w in weights.items()}
    values.update({f"local.{d}": v for d, v in local.items()})
    return to_record({key: np.array([value], np.float64) for key, value in values.items()})


def unpack(record: ArrayRecord) -> tuple[dict[str, float], dict[str, float]]:
    """Inverse of :func:`pack`."""
    weights: dict[str, float] = {}
    local: dict[str, float] = {}
    for key, array in from_record(record).items():
        kind, domain = key.split(".", 1)
        (weights if kind == "weight" else local)[domain] = float(array[0])
    return weights, local
