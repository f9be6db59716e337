"""Strategy names (``strategy.name`` in conf/strategy/*.yaml) -> configured instances."""

from __future__ import annotations

from typing import Any

from fedalign.config import ConfigError, Silo
from fedalign.runlog import RunRecorder
from strategies.fedavg import SiloFedAvg
from strategies.fedavg_stock import StockFedAvg
from strategies.fedbn import FedBN
from strategies.fedka import FedKA
from strategies.fedprox import FedProx
from strategies.fisher import FisherAggregator, FisherMerge, FisherSettings
from strategies.robust import RobustAggregator

STRATEGIES = (
    "fedavg",
    "fedavg_stock",
    "fedprox",
    "fedbn",
    "fisher",
    "fedka",
    "fedvote",
    "fedka_fisher",
)


def fisher_parts(cfg: Any) -> tuple[FisherSettings, set[str]]:
    """Fisher settings from ``strategy.fisher`` and the model's parameter names."""
    from fedalign.models import build_model

    f = cfg.strategy.fisher
    settings = FisherSettings(
        mode=str(f.mode),
        samples=int(f.samples),
        floor=float(f.floor),
        normalize=bool(f.normalize),
        weighting=str(f.weighting),
        transport=str(f.transport),
    )
    model = build_model(cfg.model.name, int(cfg.model.num_classes), int(cfg.model.in_channels))
    return settings, {name for name, _ in model.named_parameters()}


def build_strategy(cfg: Any, roster: dict[int, Silo], recorder: RunRecorder) -> SiloFedAvg:
    """The configured strategy for this roster, with the ``updates`` checks and aggregator."""
    strategy = _strategy(cfg, roster, recorder)
    u = cfg.updates
    strategy.max_update_norm = None if u.max_norm is None else float(u.max_norm)
    if u.robust != "none":
        strategy.aggregator = RobustAggregator(
            str(u.robust), float(u.trim_beta), int(u.num_malicious)
        )
    return strategy


def _alignment_blocks(s: Any) -> dict[str, Any]:
    """FedKA's disentangler and class-aware alignment; a block that is off has weight 0."""
    d, c = s.disentangle, s.class_align
    return {
        "disentangle_weight": float(d.weight) if d.enabled else 0.0,
        "disentangle_schedule": str(d.schedule),
        "disentangle_hidden": int(d.hidden),
        "class_align_weight": float(c.weight) if c.enabled else 0.0,
        "class_min_count": int(c.min_count),
    }


def _strategy(cfg: Any, roster: dict[int, Silo], recorder: RunRecorder) -> SiloFedAvg:
    s = cfg.strategy
    common = {"num_rounds": int(cfg.rounds), "min_sources": int(s.min_sources)}
    if s.name == "fedavg":
        return SiloFedAvg(roster, recorder, **common)
    if s.name == "fedavg_stock":
        return StockFedAvg(roster, recorder, **common)
    if s.name == "fedprox":
        return FedProx(roster, recorder, **common, proximal_mu=float(s.proximal_mu))
    if s.name == "fedbn":
        return FedBN(roster, recorder, **common)
    if s.name == "fisher":
        settings, names = fisher_parts(cfg)
        return FisherMerge(roster, recorder, **common, settings=settings, parameter_names=names)
    if s.name in ("fedka", "fedvote", "fedka_fisher"):
        aggregator = FisherAggregator(*fisher_parts(cfg)) if s.aggregation == "fisher" else None
        return FedKA(
            roster,
            recorder,
            **common,
            align=bool(s.align),
            vote=bool(s.vote),
            start_from=str(s.start_from),
            mmd_weight=float(s.mmd_weight),
            **_alignment_blocks(s),
            target_config={
                "embed-samples": int(s.embed_samples),
                "embed-transport": str(s.embed_transport),
                "vote-samples": int(s.vote_samples),
                "soft-vote": bool(s.soft_vote),
                "min-agreement": float(s.min_agreement),
                "vote-target-stats": bool(s.vote_target_stats),
                "finetune-steps": int(s.finetune_steps),
                "kernel-mul": float(s.kernel_mul),
                "kernel-num": int(s.kernel_num),
            },
            aggregator=aggregator,
        )
    raise ConfigError(f"config: strategy.name={s.name!r} (known: {', '.join(STRATEGIES)})")
