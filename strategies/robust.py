"""Robust aggregation: Flower's FedMedian, FedTrimmedAvg and Krum as drop-in aggregators.

``updates.robust`` in the config picks one; it replaces FedAvg's weighted average wherever a
strategy averages weights (fedavg, fedprox, fedbn, fedka, fedvote), not Fisher merging. Flower's
strategies do the math; this adapter only hands them copies of the already validated replies
with the two records they expect (weights and metrics), since they consume their input.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from fedalign.protocol import ARRAYS, METRICS
from fedalign.settings.updates import ROBUST


class RobustAggregator:
    """Aggregates validated train replies with one of Flower's robust strategies.

    Parameters
    ----------
    kind : {"median", "trimmed_mean", "krum"}
        FedMedian (coordinate-wise median), FedTrimmedAvg (mean after cutting ``beta`` of the
        values at each end) or Krum (the one update closest to its neighbours).
    beta : float (default: 0.2)
        FedTrimmedAvg's fraction cut at each end, in [0, 0.5).
    num_malicious : int (default: 1)
        Krum's assumed number of malicious silos.
    """

    def __init__(self, kind: str, beta: float = 0.2, num_malicious: int = 1) -> None:
        if kind == "median":
            self.strategy = FedMedian(arrayrecord_key=ARRAYS)
        elif kind == "trimmed_mean":
            self.strategy = FedTrimmedAvg(beta=beta, arrayrecord_key=ARRAYS)
        elif kind == "krum":
            self.strategy = Krum(num_malicious_nodes=num_malicious, arrayrecord_key=ARRAYS)
        else:
            raise ValueError(f"robust aggregation {kind!r} (known: {', '.join(ROBUST[1:])})")
        self.kind = kind

    def __call__(
        self, server_round: int, replies: list[Message], domains: list[str]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        copies = [
            Message(
                RecordDict(
                    {
                        ARRAYS: ArrayRecord({k: a for k, a in r.content[ARRAYS].items()}),
                        METRICS: MetricRecord(dict(r.content[METRICS])),
                    }
                ),
                r.metadata.src_node_id,
                MessageType.TRAIN,
            )
            for r in replies
        ]
        return self.strategy.aggregate_train(server_round, copies)
