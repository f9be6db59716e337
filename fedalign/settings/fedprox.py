"""FedProx's settings (conf/strategy/fedprox.yaml); the sources read them from ``train``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from omegaconf import DictConfig

from fedalign.settings.checks import number
from fedalign.settings.fedavg import FedAvgSettings, WireValue

MU = "proximal-mu"  # wire key


@dataclass(frozen=True)
class FedProxSettings(FedAvgSettings):
    """FedAvg whose sources add ``proximal_mu / 2 * ||w - w_global||^2`` to their loss.

    Parameters
    ----------
    proximal_mu : float (default: 0.01)
        Weight of the proximal term; 0 is FedAvg.
    """

    name: str = "fedprox"
    proximal_mu: float = 0.01

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        mu = float(number(cfg, "strategy.proximal_mu", float, minimum=0))
        return {**super().fields_from(cfg), "proximal_mu": mu}

    def to_wire(self) -> dict[str, WireValue]:
        return {MU: float(self.proximal_mu)}

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self | None:
        """The settings a ``train`` config carries, or None when it carries none."""
        return cls(proximal_mu=float(config[MU])) if MU in config else None
