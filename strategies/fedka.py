"""FedKA — Federated Knowledge Alignment (Sun, Chong, Ochiai, ACML 2022), and FedVote.

The target silo is FedKA's "global workspace". A round is two message phases:

A. ``train`` to every source, with the global model and what the alignment blocks that are on
   need from the previous round: the target embeddings (MK-MMD, the disentangler) and the target's
   class-conditional statistics (class-aware alignment). Sources minimise cross-entropy plus
   ``mmd_weight * alpha * MK-MMD(own features, target embeddings)``, plus
   ``disentangle_weight * domain loss`` of their own discriminator behind a gradient reversal of
   scale alpha (or 1), plus ``class_align_weight * alpha * class-aware loss``, evaluate the
   received model on their own test split, and reply with their weights. The server aggregates
   them (FedAvg).
B. ``train.vote`` to the target silo, with the aggregate and every source model. It votes
   pseudo-labels with the source models, fine-tunes the aggregate on them (loss * alpha),
   evaluates, and replies with the fine-tuned weights, the next round's embeddings and the
   vote statistics (and, class-aware alignment on, the class statistics of the voted samples).
   With voting off, ``query.embed`` only evaluates and embeds.

Before round 1 one ``query.embed`` phase gets the initial embeddings and the untrained model's
target accuracy; after the last round the sources evaluate the final model.
FedVote is this strategy with every alignment block off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedalign.align import alpha_schedule
from fedalign.config import Silo
from fedalign.errors import FederationError
from fedalign.runlog import RunRecorder
from strategies.fedavg import Aggregator, SiloFedAvg
from strategies.utils import (
    ARRAYS,
    CLASS_STATS,
    CONFIG,
    EMBED,
    EMBEDDINGS,
    METRICS,
    VOTE,
    source_model_key,
)

log = logging.getLogger("fedalign.strategy")
TRAINING_TERMS = ("mmd", "domain-loss", "domain-accuracy", "class-align-loss")  # source means


class FedKA(SiloFedAvg):
    """Federated knowledge alignment: disentangler + MK-MMD alignment + federated vote.

    Parameters
    ----------
    roster, recorder, num_rounds, min_sources
        As for :class:`SiloFedAvg`.
    align : bool (default: True)
        Sources add ``mmd_weight * alpha(p) * MK-MMD`` to their loss (off: FedVote).
    vote : bool (default: True)
        The target silo votes pseudo-labels and fine-tunes the aggregate.
    start_from : {"finetuned", "averaged"} (default: "finetuned")
        Which model the next round starts from; "averaged" reproduces the official notebook
        (the fine-tuned model then serves embeddings and evaluation only).
    mmd_weight : float (default: 1.0)
        Multiplies alpha(p) for the alignment term.
    disentangle_weight : float (default: 0.0)
        Weight of each source's domain-adversarial loss (0: no disentangler).
    disentangle_schedule : {"alpha", "constant"} (default: "alpha")
        The gradient reversal's scale: alpha(p), as in the paper, or 1.
    disentangle_hidden : int (default: 100)
        Hidden width of the sources' domain discriminators.
    class_align_weight : float (default: 0.0)
        Multiplies alpha(p) for the class-aware term (0: off; no class statistics travel).
    class_min_count : int (default: 8)
        Kept pseudo-labels a class needs before its statistics are sent.
    target_config : dict
        Sent to the target silo: embed-samples, embed-transport, vote-samples, soft-vote,
        min-agreement, vote-target-stats, finetune-steps, kernel-mul, kernel-num.
    aggregator : Aggregator, optional
        How source models are combined (default FedAvg; ``FisherAggregator`` for Fisher).
    """

    def __init__(
        self,
        roster: dict[int, Silo],
        recorder: RunRecorder,
        num_rounds: int,
        min_sources: int = 1,
        align: bool = True,
        vote: bool = True,
        start_from: str = "finetuned",
        mmd_weight: float = 1.0,
        disentangle_weight: float = 0.0,
        disentangle_schedule: str = "alpha",
        disentangle_hidden: int = 100,
        class_align_weight: float = 0.0,
        class_min_count: int = 8,
        target_config: dict[str, float | int | bool] | None = None,
        aggregator: Aggregator | None = None,
    ) -> None:
        super().__init__(roster, recorder, num_rounds, min_sources, aggregator)
        targets = [s.domain for s in roster.values() if s.role == "target"]
        if len(targets) != 1:
            raise FederationError(
                f"FedKA needs exactly one target silo (role=target), found {len(targets)}"
                f"{': ' + ', '.join(sorted(targets)) if targets else ''}; fix the node-configs"
            )
        if start_from not in ("finetuned", "averaged"):
            raise FederationError(f"strategy.start_from={start_from!r} (use finetuned or averaged)")
        if disentangle_schedule not in ("alpha", "constant"):
            raise FederationError(
                f"strategy.disentangle.schedule={disentangle_schedule!r} (use alpha or constant)"
            )
        self.align = align
        self.vote = vote
        self.start_from = start_from
        self.mmd_weight = mmd_weight
        self.disentangle_weight = disentangle_weight
        self.disentangle_schedule = disentangle_schedule
        self.disentangle_hidden = disentangle_hidden
        self.class_align_weight = class_align_weight
        self.class_min_count = class_min_count
        self.target_config = dict(target_config or {})
        self.embeddings: ArrayRecord | None = None
        self.class_stats: ArrayRecord | None = None
        self.next_arrays: ArrayRecord | None = None
        self.round_start: ArrayRecord | None = None
        self.round_aggregate: ArrayRecord | None = None

    CHECKPOINTED: ClassVar[dict[str, str]] = {
        **SiloFedAvg.CHECKPOINTED,
        "embeddings": "embeddings",  # what the sources align to in the next round
        "class-stats": "class_stats",  # the target's class statistics for the next round
        "next": "next_arrays",  # the fine-tuned model the next round starts from
    }

    def alpha(self, server_round: int) -> float:
        """alpha(p) with p = server_round / num_rounds, the training progress after it."""
        return alpha_schedule(server_round / self.num_rounds)

    @property
    def needs_embeddings(self) -> bool:
        """MK-MMD and the disentangler read the target embeddings; class alignment does not."""
        return self.align or self.disentangle_weight > 0

    # Before round 1 ----------------------------------------------------------------------
    def before_rounds(self, grid: Grid, initial_arrays: ArrayRecord) -> None:
        """One ``query.embed`` phase: first embeddings and the untrained model's accuracy."""
        self.start_phase(grid)
        replies = self.ask_target(grid, EMBED, 0, initial_arrays)
        self.take_target_reply(0, replies, initial_arrays)
        self.end_phase(0)

    # Phase A: sources ----------------------------------------------------------------------
    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        extra: dict[str, float | int] = {}
        content = RecordDict({ARRAYS: arrays})
        alpha = self.alpha(server_round)
        if self.needs_embeddings and self.embeddings is not None:
            content[EMBEDDINGS] = self.embeddings
        if self.align and self.embeddings is not None:
            extra |= {
                "mmd-weight": self.mmd_weight * alpha,
                "kernel-mul": float(self.target_config.get("kernel-mul", 2.0)),
                "kernel-num": int(self.target_config.get("kernel-num", 5)),
            }
        if self.disentangle_weight > 0 and self.embeddings is not None:
            extra |= {
                "disentangle-weight": self.disentangle_weight,
                "reversal-scale": alpha if self.disentangle_schedule == "alpha" else 1.0,
                "disentangle-hidden": self.disentangle_hidden,
            }
        if self.class_align_weight > 0 and self.class_stats is not None:
            content[CLASS_STATS] = self.class_stats
            extra["class-align-weight"] = self.class_align_weight * alpha
        content[CONFIG] = ConfigRecord({**config, **extra})
        return content

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        arrays = self.next_arrays if self.next_arrays is not None else arrays
        self.round_start = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        return self.expect([m for m in messages if m.metadata.message_type == "train"])

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
    def ask_target(
        self, grid: Grid, message_type: str, server_round: int, arrays: ArrayRecord
    ) -> list[Message]:
        content = RecordDict({ARRAYS: arrays})
        if message_type == VOTE:
            for domain, model in self.source_models.items():
                content[source_model_key(domain)] = model
        config = {
            **self.train_config,
            **self.target_config,
            "server-round": server_round,
            "alpha": self.alpha(server_round),
            "start-from": self.start_from,
            "embed-samples": (
                int(self.target_config.get("embed-samples", 512)) if self.needs_embeddings else 0
            ),
            "class-min-count": self.class_min_count if self.class_align_weight > 0 else 0,
        }
        content[CONFIG] = ConfigRecord(config)
        messages = self.messages(self.nodes("target", grid), content, message_type)
        return list(grid.send_and_receive(messages, timeout=self.timeout))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Phase B runs here, where Flower's loop has the aggregate of this round.
        self.start_phase(grid)
        kind = VOTE if self.vote and self.source_models else EMBED
        replies = self.ask_target(grid, kind, server_round, self.round_aggregate)
        self.take_target_reply(server_round, replies, self.round_aggregate)
        self.end_phase(server_round)
        return []

    def take_target_reply(
        self, server_round: int, replies: list[Message], aggregate: ArrayRecord
    ) -> None:
        """Record the target's metrics; keep its fine-tuned weights and embeddings."""
        replies = [
            r
            for r in self.drop_errors(replies, f"round {server_round} target")
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
        domain = self.silo_of(reply)
        self.recorder.silo(server_round, domain, metrics)
        tuned = reply.content.array_records.get(ARRAYS)
        if tuned is not None and not same_layout(tuned, aggregate):
            log.warning(
                "round %d: ignored the target's fine-tuned weights (they do not match the model)",
                server_round,
            )
            tuned = None
        self.final_arrays = tuned if tuned is not None else aggregate
        self.next_arrays = tuned if tuned is not None and self.start_from == "finetuned" else None
        if EMBEDDINGS in reply.content.array_records:
            self.embeddings = reply.content[EMBEDDINGS]
        if CLASS_STATS in reply.content.array_records:
            self.class_stats = reply.content[CLASS_STATS]
        self.recorder.metrics(server_round, **diagnostics(metrics))

    def final_evaluation_nodes(self, grid: Grid) -> list[int]:
        return self.nodes("source", grid)  # the target evaluated the final model in phase B


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
