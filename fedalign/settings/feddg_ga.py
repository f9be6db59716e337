"""FedDG-GA's settings (conf/strategy/feddg_ga.yaml); the math is ``fedalign.generalization``.

Defaults from the official code (MediaBrain-SJTU/FedDG-GA, ``algorithms/*/train_pacs_GA.py``):
``--step_size 0.2``, decayed linearly over the rounds. Its scripts measure the gap in accuracy
(``--fair acc``); the paper defines it on the loss, the default here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf

from fedalign.generalization import GAP_METRICS, SCHEDULES
from fedalign.settings.checks import choice, number, require
from fedalign.settings.fedavg import FedAvgSettings, WireValue

EVALUATE_TRAINED = "evaluate-trained"  # wire key: sources also evaluate their trained model


@dataclass(frozen=True)
class FedDGGASettings(FedAvgSettings):
    """FedAvg whose aggregation weights follow each source's generalization gap.

    Parameters
    ----------
    step_size : float (default: 0.2)
        ``d``, the step size of the first adjustment, in [0, 1]; 0 keeps uniform weights.
    step_schedule : {"linear", "constant"} (default: "linear")
        ``linear`` decays ``d`` to ``d / R`` over the R rounds (``fedalign.generalization``).
    gap_metric : {"loss", "accuracy"} (default: "loss")
        What the gap compares: the held-out loss, or the held-out accuracy.
    """

    name: str = "feddg_ga"
    step_size: float = 0.2
    step_schedule: str = "linear"
    gap_metric: str = "loss"

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        step = float(number(cfg, "strategy.step_size", float, minimum=0))
        require(step <= 1, f"strategy.step_size={step} must be in [0, 1]")
        robust = OmegaConf.select(cfg, "updates.robust")
        require(
            robust in (None, "none"),
            f"updates.robust={robust} replaces the weighted average whose weights strategy "
            f"{cfg.strategy.name} adjusts; use updates.robust=none with it",
        )
        return {
            **super().fields_from(cfg),
            "step_size": step,
            "step_schedule": choice(cfg, "strategy.step_schedule", SCHEDULES),
            "gap_metric": choice(cfg, "strategy.gap_metric", GAP_METRICS),
        }

    def to_wire(self) -> dict[str, WireValue]:
        return {EVALUATE_TRAINED: True}

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self | None:
        """The settings a ``train`` config carries (the sources' part), or None."""
        return cls() if bool(config.get(EVALUATE_TRAINED, False)) else None
