"""Strategy names (``strategy.name`` in conf/strategy/*.yaml) -> constructors."""

from __future__ import annotations

from typing import Any

from fedalign.config import ConfigError, Silo
from fedalign.runlog import RunRecorder
from strategies.fedavg import SiloFedAvg


def build_strategy(cfg: Any, roster: dict[int, Silo], recorder: RunRecorder) -> SiloFedAvg:
    """Instantiate the configured strategy for this roster."""
    name = cfg.strategy.name
    if name == "fedavg":
        return SiloFedAvg(
            roster, recorder, num_rounds=int(cfg.rounds), min_sources=int(cfg.strategy.min_sources)
        )
    raise ConfigError(f"config: strategy.name={name!r} is not implemented (known: fedavg)")
