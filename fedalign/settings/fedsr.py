"""FedSR's settings (conf/strategy/fedsr.yaml); the silos read them from their messages.

Defaults are the official code's (github.com/atuannguyen/FedSR, ``src/argument.py``):
``--L2R_coeff 1e-2``, ``--CMI_coeff 5e-4``, ``--num_samples 20``. (Its README's PACS command
uses ``--CMI_coeff 0.001``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from omegaconf import DictConfig

from fedalign.settings.checks import number
from fedalign.settings.fedavg import FedAvgSettings, WireValue

L2R_WEIGHT = "fedsr-l2r-weight"  # wire keys of ``train``
CMI_WEIGHT = "fedsr-cmi-weight"
EVAL_SAMPLES = "fedsr-eval-samples"  # in every message: build FedSR's probabilistic model


@dataclass(frozen=True)
class FedSRSettings(FedAvgSettings):
    """FedAvg of probabilistic models whose sources add FedSR's L2R and CMI terms.

    Parameters
    ----------
    l2r_weight : float (default: 0.01)
        Weight of the L2R term, the mean norm of z (official ``L2R_coeff``); 0 turns it off.
    cmi_weight : float (default: 0.0005)
        Weight of the CMI term, the KL to the class-conditional reference (official
        ``CMI_coeff``); 0 turns it off.
    eval_samples : int (default: 20)
        Samples of z whose class probabilities are averaged at evaluation (official
        ``num_samples``).
    """

    name: str = "fedsr"
    l2r_weight: float = 0.01
    cmi_weight: float = 0.0005
    eval_samples: int = 20

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        return {
            **super().fields_from(cfg),
            "l2r_weight": float(number(cfg, "strategy.l2r_weight", float, minimum=0)),
            "cmi_weight": float(number(cfg, "strategy.cmi_weight", float, minimum=0)),
            "eval_samples": int(number(cfg, "strategy.eval_samples")),
        }

    def model_wire(self) -> dict[str, WireValue]:
        return {EVAL_SAMPLES: int(self.eval_samples)}

    def to_wire(self) -> dict[str, WireValue]:
        return {L2R_WEIGHT: float(self.l2r_weight), CMI_WEIGHT: float(self.cmi_weight)}

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self | None:
        """The settings a ``train`` config carries, or None when it carries none."""
        if EVAL_SAMPLES not in config:
            return None
        return cls(
            l2r_weight=float(config[L2R_WEIGHT]),
            cmi_weight=float(config[CMI_WEIGHT]),
            eval_samples=int(config[EVAL_SAMPLES]),
        )
