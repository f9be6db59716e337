"""Strategy names (``strategy.name`` in conf/strategy/*.yaml) -> strategies, assembled.

Each name's settings class is in ``fedalign.settings.catalog``; FedProx, FedBN and FedSR are
FedAvg's rounds whose sources read their settings from ``train`` (``client/source.py``),
``fisher`` is FedAvg's rounds with a Fisher merge in place of the weighted average,
``feddg_ga`` FedAvg's rounds averaging by generalization-adjusted weights, and ``oneshot`` one
such round, merged by the average, a Fisher merge or a Fisher merge after matching hidden units.
"""

from __future__ import annotations

from typing import Any

from fedalign.config import Silo
from fedalign.runlog import RunRecorder
from fedalign.settings.catalog import strategy_settings
from fedalign.settings.fedavg import FedAvgSettings
from fedalign.settings.feddg_ga import FedDGGASettings
from fedalign.settings.updates import UpdateSettings
from strategies.fedavg import SiloFedAvg, WeightedAverage
from strategies.fedavg_stock import StockFedAvg
from strategies.feddg_ga import GA_WEIGHT, FedDGGA
from strategies.fedka import FedKA
from strategies.fisher import FisherAggregator
from strategies.oneshot import OneShot
from strategies.permuted_fisher import PermutedFisherAggregator
from strategies.recording import RoundRecorder
from strategies.robust import RobustAggregator
from strategies.roster import Roster
from strategies.strategy import Aggregator, SiloStrategy
from strategies.validation import ReplyValidator

STRATEGIES: dict[str, type[SiloStrategy]] = {
    "fedavg": SiloFedAvg,
    "fedavg_stock": StockFedAvg,
    "fedprox": SiloFedAvg,
    "fedbn": SiloFedAvg,
    "fedsr": SiloFedAvg,
    "fisher": SiloFedAvg,
    "feddg_ga": FedDGGA,
    "fedka": FedKA,
    "fedvote": FedKA,
    "fedka_fisher": FedKA,
    "oneshot": OneShot,
}


def parameter_names(cfg: Any) -> set[str]:
    """The configured model's parameter names (a Fisher merge averages everything else)."""
    from fedalign.models import build_model

    model = build_model(cfg.model.name, int(cfg.model.num_classes), int(cfg.model.in_channels))
    return {name for name, _ in model.named_parameters()}


def aggregator_for(cfg: Any, settings: FedAvgSettings, updates: UpdateSettings) -> Aggregator:
    """Fisher merge (after matching hidden units: ``oneshot``), a robust aggregator
    (``updates.robust``) or FedAvg's weighted average (by example count; by the
    generalization-adjusted weights for ``feddg_ga``)."""
    if settings.aligns_units:
        return PermutedFisherAggregator(settings.fisher, parameter_names(cfg), cfg.model.name)
    if settings.merges_by_fisher:
        return FisherAggregator(settings.fisher, parameter_names(cfg))  # fisher, fedka_fisher
    if isinstance(settings, FedDGGASettings):
        return WeightedAverage(GA_WEIGHT)
    if updates.robust != "none":
        return RobustAggregator(updates.robust, updates.trim_beta, updates.num_malicious)
    return WeightedAverage()


def build_strategy(cfg: Any, silos: dict[int, Silo], recorder: RunRecorder) -> SiloStrategy:
    """The configured strategy for these silos, given its collaborators.

    Parameters
    ----------
    cfg : DictConfig
        The validated run config.
    silos : dict[int, Silo]
        Node ID -> silo, from discovery.
    recorder : RunRecorder
        The run record.
    """
    settings = strategy_settings(cfg)
    updates = UpdateSettings.from_config(cfg, settings.merges_by_fisher)
    strategy = STRATEGIES[settings.name]
    aggregator = aggregator_for(cfg, settings, updates)
    return assemble(
        strategy, settings, silos, recorder, int(cfg.rounds), aggregator, updates.max_norm
    )


def assemble(
    strategy: type[SiloStrategy],
    settings: FedAvgSettings,
    silos: dict[int, Silo],
    recorder: RunRecorder,
    num_rounds: int,
    aggregator: Aggregator | None = None,
    max_update_norm: float | None = None,
) -> SiloStrategy:
    """``strategy`` with its collaborators made from these parts.

    Parameters
    ----------
    strategy : type of SiloStrategy
        The class to build (``STRATEGIES[name]``).
    settings : FedAvgSettings
        Its settings.
    silos : dict[int, Silo]
        Node ID -> silo, from discovery.
    recorder : RunRecorder
        The run record.
    num_rounds : int
        Total rounds.
    aggregator : Aggregator, optional
        FedAvg's weighted average when omitted.
    max_update_norm : float, optional
        ``updates.max_norm``.
    """
    roster = Roster(silos)
    return strategy(
        settings,
        num_rounds,
        roster,
        RoundRecorder(recorder, roster),
        ReplyValidator(max_update_norm),
        aggregator or WeightedAverage(),
    )
