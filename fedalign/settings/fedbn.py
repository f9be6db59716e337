"""FedBN's settings (conf/strategy/fedbn.yaml): the sources keep their BatchNorm local."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from fedalign.settings.fedavg import FedAvgSettings, WireValue

LOCAL_BATCHNORM = "local-batchnorm"  # wire key


@dataclass(frozen=True)
class FedBNSettings(FedAvgSettings):
    """FedAvg with silo-local BatchNorm weights and statistics (no settings of its own)."""

    name: str = "fedbn"

    def to_wire(self) -> dict[str, WireValue]:
        return {LOCAL_BATCHNORM: True}

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self | None:
        """The settings a ``train`` config carries, or None when it carries none."""
        return cls() if bool(config.get(LOCAL_BATCHNORM, False)) else None
