"""Fisher-weighted merging's settings (conf/fisher/default.yaml, under ``strategy.fisher``).

Used by ``strategy=fisher`` and by FedKA with ``strategy.aggregation=fisher``. The sources
read what to compute from ``train`` (``to_wire``/``from_wire``); the server merges with the
floor, normalisation and weighting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf

from fedalign.settings.checks import choice, number
from fedalign.settings.fedavg import FedAvgSettings, WireValue

MODES = ("exact", "empirical", "sampled")
WEIGHTINGS = ("examples", "uniform")
TRANSPORTS = ("float32", "float16")
MIN_FLOOR = 1e-30  # the smallest Fisher floor: the config and the merge refuse less


@dataclass(frozen=True)
class FisherSettings:
    """What the sources compute and how the server merges.

    Parameters
    ----------
    mode : {"exact", "empirical", "sampled"} (default: "exact")
        How the diagonal Fisher is estimated (``fedalign.fisher.diagonal_fisher``).
    samples : int (default: 512)
        Examples per silo per round.
    floor : float (default: 1e-6)
        ``F~ = max(F, floor)`` in the merge; at least ``MIN_FLOOR``.
    normalize : bool (default: True)
        Divide each silo's weight by its Fisher's global L2 norm.
    weighting : {"examples", "uniform"} (default: "examples")
        The silo weights lambda_i.
    transport : {"float32", "float16"} (default: "float32")
        float16 halves the Fisher's upload (scaled per array).
    """

    mode: str = "exact"
    samples: int = 512
    floor: float = 1e-6
    normalize: bool = True
    weighting: str = "examples"
    transport: str = "float32"

    @classmethod
    def from_config(cls, cfg: DictConfig, key: str = "strategy.fisher") -> Self:
        """The settings under ``key`` in ``cfg``, validated (``ConfigError``)."""
        return cls(
            mode=choice(cfg, f"{key}.mode", MODES),
            samples=int(number(cfg, f"{key}.samples")),
            floor=float(number(cfg, f"{key}.floor", float, minimum=MIN_FLOOR)),
            normalize=bool(OmegaConf.select(cfg, f"{key}.normalize")),
            weighting=choice(cfg, f"{key}.weighting", WEIGHTINGS),
            transport=choice(cfg, f"{key}.transport", TRANSPORTS),
        )

    def to_wire(self) -> dict[str, WireValue]:
        """Keys added to every ``train`` config so that sources send a Fisher."""
        return {
            "fisher": True,
            "fisher-mode": self.mode,
            "fisher-samples": self.samples,
            "fisher-transport": self.transport,
        }

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self | None:
        """What a ``train`` config asks the source to compute, or None (no Fisher)."""
        if not config.get("fisher", False):
            return None
        return cls(
            mode=str(config.get("fisher-mode", cls.mode)),
            samples=int(config.get("fisher-samples", cls.samples)),
            transport=str(config.get("fisher-transport", cls.transport)),
        )


@dataclass(frozen=True)
class FisherMergeSettings(FedAvgSettings):
    """``strategy=fisher``: FedAvg's rounds with Fisher-weighted merging.

    Parameters
    ----------
    fisher : FisherSettings
        ``strategy.fisher``.
    """

    name: str = "fisher"
    fisher: FisherSettings = field(default_factory=FisherSettings)

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        return {**super().fields_from(cfg), "fisher": FisherSettings.from_config(cfg)}

    @property
    def merges_by_fisher(self) -> bool:
        return True

    def to_wire(self) -> dict[str, WireValue]:
        return self.fisher.to_wire()
