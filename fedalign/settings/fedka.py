"""FedKA's settings (conf/strategy/fedka.yaml; fedvote and fedka_fisher extend it).

``FedKASettings`` is what the server is configured with. Each round it writes two configs:
``source_wire`` for the sources' ``train`` (the round's alignment weights, already multiplied
by alpha(p)) and ``target_wire`` for the target silo's ``query.embed`` / ``train.vote``.
The silos read them back with ``SourceAlignment.from_wire`` and ``TargetRound.from_wire``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf

from fedalign.settings.checks import choice, flag, number, require
from fedalign.settings.fedavg import FedAvgSettings, WireValue
from fedalign.settings.fisher import TRANSPORTS, FisherSettings

START_FROM = ("finetuned", "averaged")
AGGREGATIONS = ("fedavg", "fisher")
SCHEDULES = ("alpha", "constant")


@dataclass(frozen=True)
class DisentangleSettings:
    """The features disentangler (``strategy.disentangle``): a domain discriminator per source.

    Parameters
    ----------
    enabled : bool (default: True)
    weight : float (default: 0.1)
        Of the domain loss.
    schedule : {"alpha", "constant"} (default: "alpha")
        The gradient reversal's scale: alpha(p), as in the paper, or 1.
    hidden : int (default: 100)
        The discriminator's hidden width.
    """

    enabled: bool = True
    weight: float = 0.1
    schedule: str = "alpha"
    hidden: int = 100

    @classmethod
    def from_config(cls, cfg: DictConfig, key: str = "strategy.disentangle") -> Self:
        """The block under ``key``, validated (``ConfigError``)."""
        return cls(
            enabled=flag(cfg, f"{key}.enabled"),
            weight=float(number(cfg, f"{key}.weight", float, minimum=0)),
            schedule=choice(cfg, f"{key}.schedule", SCHEDULES),
            hidden=int(number(cfg, f"{key}.hidden")),
        )


@dataclass(frozen=True)
class ClassAlignSettings:
    """Class-aware alignment (``strategy.class_align``): sources pull to the target's class means.

    Parameters
    ----------
    enabled : bool (default: False)
    weight : float (default: 0.1)
        Multiplies alpha(p).
    min_count : int (default: 8)
        Kept pseudo-labels a class needs before its statistics are sent.
    """

    enabled: bool = False
    weight: float = 0.1
    min_count: int = 8

    @classmethod
    def from_config(cls, cfg: DictConfig, key: str = "strategy.class_align") -> Self:
        """The block under ``key``, validated (``ConfigError``)."""
        enabled = flag(cfg, f"{key}.enabled")
        weight = float(number(cfg, f"{key}.weight", float, minimum=0))
        return cls(enabled, weight, int(number(cfg, f"{key}.min_count", minimum=2)))


def _agreement(cfg: DictConfig) -> float:
    agreement = float(number(cfg, "strategy.min_agreement", float, minimum=0))
    require(agreement <= 1, f"strategy.min_agreement={agreement} must be in [0, 1]")
    return agreement


@dataclass(frozen=True)
class FedKASettings(FedAvgSettings):
    """FedKA, FedVote (``align`` and the disentangler off) and FedKA with Fisher merging.

    Parameters
    ----------
    align : bool (default: True)
        Sources add ``mmd_weight * alpha(p) * MK-MMD(features, target embeddings)``.
    vote : bool (default: True)
        The target silo votes pseudo-labels and fine-tunes the aggregate.
    aggregation : {"fedavg", "fisher"} (default: "fedavg")
        How source models are combined (``fisher``: by the settings in ``fisher``).
    start_from : {"averaged", "finetuned"} (default: "averaged")
        The model the next round starts from (averaged: the official notebook's choice).
    mmd_weight : float (default: 0.1)
        The MK-MMD term's weight before alpha(p).
    kernel_mul, kernel_num : float, int (default: 2.0, 5)
        MK-MMD's kernel bandwidth ratio and number of kernels.
    embed_samples : int (default: 512)
        Target embeddings sent per round.
    embed_transport : {"float32", "float16"} (default: "float32")
    vote_samples : int (default: 2048)
        Target training samples voted per round.
    soft_vote : bool (default: False)
        Summed probabilities instead of the plurality of labels.
    min_agreement : float (default: 0.0)
        tau in [0, 1]: keep a sample when >= tau * K sources chose its winner.
    vote_target_stats : bool (default: True)
        Sources vote with BatchNorm on target-batch statistics (AdaBN).
    finetune_steps : int (default: 32)
        Fine-tuning batches on the pseudo-labels per round.
    disentangle, class_align : DisentangleSettings, ClassAlignSettings
    fisher : FisherSettings
        Used when ``aggregation`` is ``fisher``.
    """

    name: str = "fedka"
    align: bool = True
    vote: bool = True
    aggregation: str = "fedavg"
    start_from: str = "averaged"
    mmd_weight: float = 0.1
    kernel_mul: float = 2.0
    kernel_num: int = 5
    embed_samples: int = 512
    embed_transport: str = "float32"
    vote_samples: int = 2048
    soft_vote: bool = False
    min_agreement: float = 0.0
    vote_target_stats: bool = True
    finetune_steps: int = 32
    disentangle: DisentangleSettings = field(default_factory=DisentangleSettings)
    class_align: ClassAlignSettings = field(default_factory=ClassAlignSettings)
    fisher: FisherSettings = field(default_factory=FisherSettings)

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        s = cfg.strategy
        return {
            **super().fields_from(cfg),
            "align": bool(s.align),
            "vote": bool(s.vote),
            "start_from": choice(cfg, "strategy.start_from", START_FROM),
            "aggregation": choice(cfg, "strategy.aggregation", AGGREGATIONS),
            "embed_transport": choice(cfg, "strategy.embed_transport", TRANSPORTS),
            "vote_samples": int(number(cfg, "strategy.vote_samples")),
            "embed_samples": int(number(cfg, "strategy.embed_samples")),
            "kernel_num": int(number(cfg, "strategy.kernel_num")),
            "finetune_steps": int(number(cfg, "strategy.finetune_steps", minimum=0)),
            "mmd_weight": float(number(cfg, "strategy.mmd_weight", float, minimum=0)),
            "kernel_mul": float(number(cfg, "strategy.kernel_mul", float, minimum=1e-9)),
            "min_agreement": _agreement(cfg),
            "soft_vote": bool(s.soft_vote),
            "vote_target_stats": bool(s.vote_target_stats),
            "disentangle": DisentangleSettings.from_config(cfg),
            "class_align": ClassAlignSettings.from_config(cfg),
            "fisher": FisherSettings.from_config(cfg)
            if OmegaConf.select(cfg, "strategy.fisher") is not None
            else FisherSettings(),
        }

    @property
    def merges_by_fisher(self) -> bool:
        return self.aggregation == "fisher"

    @property
    def disentangle_weight(self) -> float:
        """The domain loss's weight; 0 when the disentangler is off."""
        return self.disentangle.weight if self.disentangle.enabled else 0.0

    @property
    def class_align_weight(self) -> float:
        """The class-aware term's weight before alpha(p); 0 when it is off."""
        return self.class_align.weight if self.class_align.enabled else 0.0

    @property
    def needs_embeddings(self) -> bool:
        """MK-MMD and the disentangler read the target embeddings; class alignment does not."""
        return self.align or self.disentangle_weight > 0

    def to_wire(self) -> dict[str, WireValue]:
        return self.fisher.to_wire() if self.merges_by_fisher else {}

    def source_wire(
        self, alpha: float, embeddings: bool, class_stats: bool
    ) -> dict[str, WireValue]:
        """The round's alignment settings for every source's ``train`` config.

        Parameters
        ----------
        alpha : float
            alpha(p) of this round; the MK-MMD and class-aware weights go out multiplied by it.
        embeddings : bool
            Whether the target's embeddings travel with this round (MK-MMD, disentangler).
        class_stats : bool
            Whether the target's class statistics travel with this round.
        """
        wire: dict[str, WireValue] = {}
        if self.align and embeddings:
            wire |= {
                "mmd-weight": self.mmd_weight * alpha,
                "kernel-mul": float(self.kernel_mul),
                "kernel-num": int(self.kernel_num),
            }
        if self.disentangle_weight > 0 and embeddings:
            wire |= {
                "disentangle-weight": self.disentangle_weight,
                "reversal-scale": alpha if self.disentangle.schedule == "alpha" else 1.0,
                "disentangle-hidden": self.disentangle.hidden,
            }
        if self.class_align_weight > 0 and class_stats:
            wire["class-align-weight"] = self.class_align_weight * alpha
        return wire

    def target_wire(self, server_round: int, alpha: float) -> dict[str, WireValue]:
        """The target silo's config for ``query.embed`` and ``train.vote`` in ``server_round``.

        Parameters
        ----------
        server_round : int
            The round (0: before round 1).
        alpha : float
            alpha(p) of the round; the fine-tuning loss is multiplied by it.
        """
        return {
            "embed-samples": int(self.embed_samples) if self.needs_embeddings else 0,
            "embed-transport": str(self.embed_transport),
            "vote-samples": int(self.vote_samples),
            "soft-vote": bool(self.soft_vote),
            "min-agreement": float(self.min_agreement),
            "vote-target-stats": bool(self.vote_target_stats),
            "finetune-steps": int(self.finetune_steps),
            "kernel-mul": float(self.kernel_mul),
            "kernel-num": int(self.kernel_num),
            "server-round": server_round,
            "alpha": alpha,
            "start-from": self.start_from,
            "class-min-count": self.class_align.min_count if self.class_align_weight > 0 else 0,
        }


@dataclass(frozen=True)
class SourceAlignment:
    """What a source aligns with this round, read from its ``train`` config.

    A weight of 0 means that block is off. ``mmd_weight`` and ``class_align_weight`` already
    include alpha(p) (``FedKASettings.source_wire``).
    """

    mmd_weight: float = 0.0
    kernel_mul: float = FedKASettings.kernel_mul
    kernel_num: int = FedKASettings.kernel_num
    disentangle_weight: float = 0.0
    reversal_scale: float = 1.0
    disentangle_hidden: int = DisentangleSettings.hidden
    class_align_weight: float = 0.0

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self:
        """The alignment a ``train`` config asks for (every block off when it asks none)."""
        return cls(
            mmd_weight=float(config.get("mmd-weight", 0.0)),
            kernel_mul=float(config.get("kernel-mul", cls.kernel_mul)),
            kernel_num=int(config.get("kernel-num", cls.kernel_num)),
            disentangle_weight=float(config.get("disentangle-weight", 0.0)),
            reversal_scale=float(config.get("reversal-scale", cls.reversal_scale)),
            disentangle_hidden=int(config.get("disentangle-hidden", cls.disentangle_hidden)),
            class_align_weight=float(config.get("class-align-weight", 0.0)),
        )


@dataclass(frozen=True)
class TargetRound:
    """What the target silo does this round, read from its ``query.embed``/``train.vote`` config.

    ``embed_samples`` 0: no embeddings; ``class_min_count`` 0: no class statistics.
    """

    embed_samples: int = 0
    embed_transport: str = FedKASettings.embed_transport
    vote_samples: int = FedKASettings.vote_samples
    soft_vote: bool = FedKASettings.soft_vote
    min_agreement: float = FedKASettings.min_agreement
    vote_target_stats: bool = FedKASettings.vote_target_stats
    finetune_steps: int = FedKASettings.finetune_steps
    alpha: float = 1.0
    start_from: str = FedKASettings.start_from
    class_min_count: int = 0

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self:
        """The round a target config describes (a key it lacks keeps its default)."""
        return cls(
            embed_samples=int(config.get("embed-samples", cls.embed_samples)),
            embed_transport=str(config.get("embed-transport", cls.embed_transport)),
            vote_samples=int(config.get("vote-samples", cls.vote_samples)),
            soft_vote=bool(config.get("soft-vote", cls.soft_vote)),
            min_agreement=float(config.get("min-agreement", cls.min_agreement)),
            vote_target_stats=bool(config.get("vote-target-stats", cls.vote_target_stats)),
            finetune_steps=int(config.get("finetune-steps", cls.finetune_steps)),
            alpha=float(config.get("alpha", cls.alpha)),
            start_from=str(config.get("start-from", cls.start_from)),
            class_min_count=int(config.get("class-min-count", cls.class_min_count)),
        )
