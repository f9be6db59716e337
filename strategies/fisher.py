"""Fisher-weighted merging (Matena & Raffel, NeurIPS 2022): ``strategy=fisher``.

Each source's train reply carries, next to its weights (``arrays``), the diagonal Fisher of its
parameters (``fisher``; with float16 transport also ``fisher-scale``). The server merges every
parameter as ``sum_i lambda_i F~_ij theta_ij / sum_i lambda_i F~_ij`` (``fedalign.merge``);
BatchNorm running statistics have no Fisher and are averaged by example count. A reply whose
Fisher is missing or malformed is left out of that round's merge, with a log line.

``strategy=fisher`` is FedAvg's rounds (``SiloFedAvg``) with ``FisherAggregator`` in place of the
weighted average; FedKA uses it too with ``strategy.aggregation=fisher``. Settings:
``fedalign.settings.fisher``; the silos' side: ``client/source.py`` (``attach_fisher``); the
math: ``fedalign/fisher.py`` (the Fisher) and ``fedalign/merge.py`` (the merge).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedalign.fisher import unpack_float16
from fedalign.merge import average_buffers, fisher_merge, split_fisher_weights
from fedalign.protocol import ARRAYS, FISHER, FISHER_SCALE, METRICS, from_record, to_record
from fedalign.settings.fisher import FisherSettings

log = logging.getLogger("fedalign.strategy")


class FisherAggregator:
    """Merges validated train replies by Fisher; a drop-in for FedAvg's aggregation.

    Parameters
    ----------
    settings : FisherSettings
        Floor, normalisation and silo weighting of the merge.
    parameter_names : set[str]
        The model's parameters; every other array (BatchNorm statistics) is averaged.
    """

    def __init__(self, settings: FisherSettings, parameter_names: set[str]) -> None:
        self.settings = settings
        self.parameter_names = parameter_names

    def fisher_of(self, reply: Message) -> dict[str, np.ndarray] | str:
        """The reply's Fisher as float32 arrays, or why it cannot be used."""
        records = reply.content.array_records
        if FISHER not in records:
            return "no fisher record"
        raw = from_record(records[FISHER])
        if set(raw) != self.parameter_names:
            return f"fisher names {sorted(set(raw) ^ self.parameter_names)[:3]} do not match"
        if FISHER_SCALE in records:
            scales = from_record(records[FISHER_SCALE])
            if set(scales) != set(raw) or any(s.shape != (1,) for s in scales.values()):
                return "fisher-scale does not match the fisher record"
            raw = unpack_float16(raw, scales)
        weights = records[ARRAYS]
        for name, values in raw.items():
            if tuple(values.shape) != tuple(weights[name].shape):
                return f"fisher '{name}' has shape {list(values.shape)}"
            if values.dtype not in (np.float16, np.float32, np.float64):
                return f"fisher '{name}' has dtype {values.dtype}"
            if not np.isfinite(values).all() or (values < 0).any():
                return f"fisher '{name}' has negative or non-finite values"
        return {name: values.astype(np.float32, copy=False) for name, values in raw.items()}

    def __call__(
        self, server_round: int, replies: list[Message], domains: list[str]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        merged_from, fishers, names = [], [], []
        for reply, domain in zip(replies, domains, strict=True):
            fisher = self.fisher_of(reply)
            if isinstance(fisher, str):
                log.warning(
                    "round %d: %s left out of the Fisher merge: %s", server_round, domain, fisher
                )
                continue
            merged_from.append(reply)
            fishers.append(fisher)
            names.append(domain)
        if not merged_from:
            log.warning("round %d: no usable Fisher; the global model is kept", server_round)
            return None, None
        weights = [from_record(r.content[ARRAYS]) for r in merged_from]
        counts = [float(r.content[METRICS]["num-examples"]) for r in merged_from]
        merged = self.merge(server_round, weights, fishers, counts, names)
        metrics = aggregate_metricrecords([r.content for r in merged_from], "num-examples")
        metrics["fisher-silos"] = len(merged_from)
        return to_record(merged), metrics

    def merge(
        self,
        server_round: int,
        weights: list[dict[str, np.ndarray]],
        fishers: list[dict[str, np.ndarray]],
        counts: list[float],
        domains: list[str],
    ) -> dict[str, np.ndarray]:
        """The merged model of the usable replies (in the order of the first one's arrays).

        Parameters
        ----------
        server_round : int
            The round, for log lines.
        weights : list of dict of str to np.ndarray
            Each silo's model.
        fishers : list of dict of str to np.ndarray
            Each silo's diagonal Fisher (float32), one array per parameter.
        counts : list of float
            Each silo's example count.
        domains : list of str
            Each silo's name.
        """
        parts = [split_fisher_weights(w, self.parameter_names) for w in weights]
        params, buffers = list(parts[0][0]), list(parts[0][1])
        merged = dict(
            zip(
                params,
                fisher_merge(
                    [[p[n] for n in params] for p, _ in parts],
                    [[f[n] for n in params] for f in fishers],
                    weights=counts if self.settings.weighting == "examples" else None,
                    floor=self.settings.floor,
                    normalize=self.settings.normalize,
                ),
                strict=True,
            )
        )
        if buffers:
            averaged = average_buffers([[b[n] for n in buffers] for _, b in parts], counts)
            merged.update(zip(buffers, averaged, strict=True))
        return {n: merged[n] for n in weights[0]}
