"""FedKA — Federated Knowledge Alignment (Sun, Chong, Ochiai, ACML 2022), and FedVote.

The target silo is FedKA's "global workspace". A round is two message phases:

A. ``train_phase``: ``train`` to every source, with the global model and what the alignment
   blocks that are on need from the previous round: the target embeddings (MK-MMD, the
   disentangler) and the target's class-conditional statistics (class-aware alignment). Sources
   minimise cross-entropy plus ``mmd_weight * alpha * MK-MMD(own features, target embeddings)``,
   plus ``disentangle_weight * domain loss`` of their own discriminator behind a gradient
   reversal of scale alpha (or 1), plus ``class_align_weight * alpha * class-aware loss``,
   evaluate the received model on their own test split, and reply with their weights. The
   server aggregates them (FedAvg, or Fisher with ``aggregation=fisher``).
B. ``target_phase``: ``train.vote`` to the target silo, with the aggregate and every source
   model. It votes pseudo-labels with the source models, fine-tunes the aggregate on them
   (loss * alpha), evaluates, and replies with the fine-tuned weights, the next round's
   embeddings and the vote statistics (and, class-aware alignment on, the class statistics of
   the voted samples). With voting off, ``query.embed`` only evaluates and embeds.

Before round 1 one ``query.embed`` phase gets the initial embeddings and the untrained model's
target accuracy; after the last round the sources evaluate the final model.
FedVote is this strategy with every alignment block off. Settings: ``fedalign.settings.fedka``;
the silos' side: ``client/source.py`` and ``client/target.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedalign.align import alpha_schedule
from fedalign.errors import FederationError
from fedalign.protocol import (
    ARRAYS,
    CLASS_STATS,
    CONFIG,
    EMBED,
    EMBEDDINGS,
    METRICS,
    VOTE,
    source_model_key,
)
from fedalign.settings.fedka import FedKASettings
from strategies.fedavg import SiloFedAvg
from strategies.strategy import SiloStrategy

log = logging.getLogger("fedalign.strategy")
TRAINING_TERMS = ("mmd", "domain-loss", "domain-accuracy", "class-align-loss")  # source means


class FedKA(SiloFedAvg):
    """Federated knowledge alignment: disentangler + MK-MMD alignment + federated vote.

    Parameters are those of :class:`strategies.strategy.SiloStrategy`, with ``settings`` a
    :class:`fedalign.settings.fedka.FedKASettings`; the roster needs exactly one target silo.
    """

    settings: FedKASettings

    CHECKPOINTED: ClassVar[dict[str, str]] = {
        **SiloStrategy.CHECKPOINTED,
        "embeddings": "embeddings",  # what the sources align to in the next round
        "class-stats": "class_stats",  # the target's class statistics for the next round
        "next": "next_arrays",  # the fine-tuned model the next round starts from
    }

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        targets = self.roster.domains("target")
        if len(targets) != 1:
            raise FederationError(
                f"FedKA needs exactly one target silo (role=target), found {len(targets)}"
                f"{': ' + ', '.join(sorted(targets)) if targets else ''}; fix the node-configs"
            )
        self.embeddings: ArrayRecord | None = None
        self.class_stats: ArrayRecord | None = None
        self.next_arrays: ArrayRecord | None = None
        self.round_start: ArrayRecord | None = None
        self.round_aggregate: ArrayRecord | None = None
        self.source_models: dict[str, ArrayRecord] = {}

    def alpha(self, server_round: int) -> float:
        """alpha(p) with p = server_round / num_rounds, the training progress after it."""
        return alpha_schedule(server_round / self.num_rounds)

    # Before round 1 ----------------------------------------------------------------------
    def before_rounds(self, grid: Grid, initial_arrays: ArrayRecord) -> None:
        """One ``query.embed`` phase: first embeddings and the untrained model's accuracy."""
        with self.rounds.phase(grid, 0):
            replies = self.ask_target(grid, EMBED, 0, initial_arrays)
            self.take_target_reply(0, replies, initial_arrays)

    # Phase A: sources ----------------------------------------------------------------------
    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        content = RecordDict({ARRAYS: arrays})
        if self.settings.needs_embeddings and self.embeddings is not None:
            content[EMBEDDINGS] = self.embeddings
        if self.settings.class_align_weight > 0 and self.class_stats is not None:
            content[CLASS_STATS] = self.class_stats
        alignment = self.settings.source_wire(
            self.alpha(server_round), self.embeddings is not None, self.class_stats is not None
        )
        content[CONFIG] = ConfigRecord({**config, **alignment})
        return content

    def evaluating_while_training(self, grid: Grid) -> list[int]:
        return []  # the target evaluates in the target phase

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        arrays = self.next_arrays if self.next_arrays is not None else arrays
        self.round_start = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def trained(self, server_round: int, replies: list[Message]) -> None:
        self.source_models = {self.rounds.silo_of(r): r.content[ARRAYS] for r in replies}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.round_aggregate = arrays if arrays is not None else self.round_start
        silos = self.recorder.silos[server_round].values()
        means = {}
        for name in TRAINING_TERMS:
            values = [m[name] for m in silos if name in m]
            if values:
                means[name.replace("-", "_")] = sum(values) / len(values)
        self.recorder.metrics(server_round, **means)
        return arrays, metrics

    # Phase B: the target silo ------------------------------------------------------------
    def target_phase(self, rnd: int, grid: Grid) -> None:
        """``train.vote`` (or ``query.embed`` with voting off) with this round's aggregate."""
        with self.rounds.phase(grid, rnd):
            kind = VOTE if self.settings.vote and self.source_models else EMBED
            replies = self.ask_target(grid, kind, rnd, self.round_aggregate)
            self.take_target_reply(rnd, replies, self.round_aggregate)

    def ask_target(
        self, grid: Grid, message_type: str, server_round: int, arrays: ArrayRecord
    ) -> list[Message]:
        """Send ``arrays`` (and for a vote every source model) to the target silo."""
        content = RecordDict({ARRAYS: arrays})
        if message_type == VOTE:
            for domain, model in self.source_models.items():
                content[source_model_key(domain)] = model
        wire = self.settings.target_wire(server_round, self.alpha(server_round))
        content[CONFIG] = ConfigRecord({**self.train_config, **wire})
        messages = self.messages(self.roster.nodes("target", grid), content, message_type)
        return list(grid.send_and_receive(messages, timeout=self.timeout))

    def take_target_reply(
        self, server_round: int, replies: list[Message], aggregate: ArrayRecord
    ) -> None:
        """Record the target's metrics; keep its fine-tuned weights and embeddings."""
        replies = [
            r
            for r in self.rounds.drop_errors(replies, f"round {server_round} target")
            if METRICS in r.content.metric_records
        ]
        if not replies:
            log.warning(
                "round %d: no usable reply from the target silo; the round keeps the aggregate",
                server_round,
            )
            self.next_arrays, self.final_arrays = None, aggregate
            return
        reply = replies[0]
        metrics = dict(reply.content[METRICS])
        self.recorder.silo(server_round, self.rounds.silo_of(reply), metrics)
        tuned = reply.content.array_records.get(ARRAYS)
        if tuned is not None and not same_layout(tuned, aggregate):
            log.warning(
                "round %d: ignored the target's fine-tuned weights (they do not match the model)",
                server_round,
            )
            tuned = None
        finetuned = self.settings.start_from == "finetuned"
        self.final_arrays = tuned if tuned is not None else aggregate
        self.next_arrays = tuned if tuned is not None and finetuned else None
        if EMBEDDINGS in reply.content.array_records:
            self.embeddings = reply.content[EMBEDDINGS]
        if CLASS_STATS in reply.content.array_records:
            self.class_stats = reply.content[CLASS_STATS]
        self.recorder.metrics(server_round, **diagnostics(metrics))

    def final_evaluation_nodes(self, grid: Grid) -> list[int]:
        return self.roster.nodes("source", grid)  # the target evaluated the final model in B


def same_layout(a: ArrayRecord, b: ArrayRecord) -> bool:
    """Same array names, shapes and dtypes."""
    return {k: (tuple(v.shape), v.dtype) for k, v in a.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in b.items()
    }


def diagnostics(metrics: dict[str, float]) -> dict[str, float]:
    """Round-level FedKA diagnostics from the target silo's reply metrics."""
    names = {
        "agreement": "vote_agreement",
        "kept-fraction": "vote_kept_fraction",
        "pseudo-label-accuracy": "pseudo_label_accuracy",
        "group-effect": "group_effect",
        "averaged-test-accuracy": "averaged_target_accuracy",
        "class-stats-classes": "class_stats_classes",
    }
    return {
        new: float(metrics[old])
        for old, new in names.items()
        if old in metrics and math.isfinite(float(metrics[old]))
    }
