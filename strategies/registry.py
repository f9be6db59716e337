"""Strategy names (``strategy.name`` in conf/strategy/*.yaml) -> configured instances."""

from __future__ import annotations

from typing import Any

from fedalign.config import ConfigError, Silo
from fedalign.runlog import RunRecorder
from strategies.fedavg import SiloFedAvg
from strategies.fedka import FedKA

STRATEGIES = ("fedavg", "fedka", "fedvote")


def build_strategy(cfg: Any, roster: dict[int, Silo], recorder: RunRecorder) -> SiloFedAvg:
    """Instantiate the configured strategy for this roster."""
    s = cfg.strategy
    common = {"num_rounds": int(cfg.rounds), "min_sources": int(s.min_sources)}
    if s.name == "fedavg":
        return SiloFedAvg(roster, recorder, **common)
    if s.name in ("fedka", "fedvote"):
        if s.aggregation != "fedavg":
            raise ConfigError(
                f"config: strategy.aggregation={s.aggregation!r} is not available (use fedavg)"
            )
        return FedKA(
            roster,
            recorder,
            **common,
            align=bool(s.align),
            vote=bool(s.vote),
            start_from=str(s.start_from),
            mmd_weight=float(s.mmd_weight),
            target_config={
                "embed-samples": int(s.embed_samples),
                "vote-samples": int(s.vote_samples),
                "soft-vote": bool(s.soft_vote),
                "min-agreement": float(s.min_agreement),
                "finetune-steps": int(s.finetune_steps),
                "kernel-mul": float(s.kernel_mul),
                "kernel-num": int(s.kernel_num),
            },
        )
    raise ConfigError(f"config: strategy.name={s.name!r} (known: {', '.join(STRATEGIES)})")
