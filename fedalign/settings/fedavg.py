"""FedAvg's settings, which every other strategy's settings extend (conf/strategy/fedavg.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from omegaconf import DictConfig

from fedalign.settings.checks import number

WireValue = bool | int | float | str  # what a ConfigRecord on the wire holds


@dataclass(frozen=True)
class FedAvgSettings:
    """What every strategy is configured with.

    Parameters
    ----------
    name : str (default: "fedavg")
        ``strategy.name``: the strategy (``fedalign.settings.catalog``).
    min_sources : int (default: 1)
        Minimum valid source replies a round needs to aggregate.
    """

    name: str = "fedavg"
    min_sources: int = 1

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Self:
        """The settings under ``strategy`` in ``cfg``, validated (``ConfigError``)."""
        return cls(**cls.fields_from(cfg))

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        """This class's constructor arguments from ``cfg``; subclasses add theirs."""
        return {
            "name": str(cfg.strategy.name),
            "min_sources": int(number(cfg, "strategy.min_sources")),
        }

    @property
    def merges_by_fisher(self) -> bool:
        """Whether the source models are combined by Fisher (no robust average then)."""
        return False

    @property
    def aligns_units(self) -> bool:
        """Whether the sources' hidden units are matched to one source's before the merge."""
        return False

    def to_wire(self) -> dict[str, WireValue]:
        """Keys every source receives with ``train`` (none for FedAvg)."""
        return {}

    def model_wire(self) -> dict[str, WireValue]:
        """Keys every message carries because both sides build the model from them
        (``fedalign.wire_model.model_from_config``; none for FedAvg)."""
        return {}
