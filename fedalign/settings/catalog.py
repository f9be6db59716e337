"""Strategy names (``strategy.name`` in conf/strategy/*.yaml) -> their settings classes.

``strategies/registry.py`` maps the same names to the strategies; a test keeps both equal.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedalign.settings.checks import choice
from fedalign.settings.fedavg import FedAvgSettings
from fedalign.settings.fedbn import FedBNSettings
from fedalign.settings.feddg_ga import FedDGGASettings
from fedalign.settings.fedka import FedKASettings
from fedalign.settings.fedprox import FedProxSettings
from fedalign.settings.fedsr import FedSRSettings
from fedalign.settings.fisher import FisherMergeSettings
from fedalign.settings.oneshot import OneShotSettings

SETTINGS: dict[str, type[FedAvgSettings]] = {
    "fedavg": FedAvgSettings,
    "fedavg_stock": FedAvgSettings,
    "fedprox": FedProxSettings,
    "fedbn": FedBNSettings,
    "fedsr": FedSRSettings,
    "fisher": FisherMergeSettings,
    "feddg_ga": FedDGGASettings,
    "fedka": FedKASettings,
    "fedvote": FedKASettings,
    "fedka_fisher": FedKASettings,
    "oneshot": OneShotSettings,
}


def strategy_settings(cfg: DictConfig) -> FedAvgSettings:
    """The settings of ``cfg``'s strategy, validated (``ConfigError`` names the key).

    Parameters
    ----------
    cfg : DictConfig
        The composed config; ``strategy.name`` must be a known strategy.
    """
    name = choice(cfg, "strategy.name", tuple(SETTINGS))
    return SETTINGS[name].from_config(cfg)
