"""Test-time adaptation at the target silo (``tta`` in conf/config.yaml), for any strategy.

With ``tta.methods`` set, the target silo also reports its test accuracy after each method, in
the same reply as its plain test accuracy: one scalar metric per method
(:func:`metric_key`), and nothing else new leaves it. The run record keeps them per round
(:func:`line_key`) and the results table shows a "METHOD + LAME" / "METHOD + AdaBN" row. The
math: ``fedalign/tta.py``; the target's side: ``client/target.py``.

LAME's defaults are the official code's (github.com/fiveai/LAME): 5 neighbours
(``LAME_KNN``), at most 100 updates, batches of 16 inputs (``ADAPTATION.BATCH_SIZE``), the
relative energy change 1e-8 as the stopping rule; the affinity is the paper's kNN one
(``affinity=rbf`` is the code's other kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf

from fedalign.settings.checks import choice, number, require
from fedalign.settings.fedavg import WireValue

METHODS = ("lame", "adabn")
LABELS = {"lame": "LAME", "adabn": "AdaBN"}  # their names in the results table
AFFINITIES = ("knn", "rbf")
WIRE = {  # field -> wire key
    "methods": "tta-methods",
    "lame_affinity": "tta-lame-affinity",
    "lame_knn": "tta-lame-knn",
    "lame_max_steps": "tta-lame-max-steps",
    "lame_batch_size": "tta-lame-batch-size",
}


def metric_key(method: str) -> str:
    """The target's reply metric: its test accuracy after ``method``."""
    return f"tta-{method}-test-accuracy"


def line_key(method: str) -> str:
    """The same accuracy in a round's line of metrics.jsonl."""
    return f"target_accuracy_{method}"


@dataclass(frozen=True)
class TTASettings:
    """Which test-time adaptations the target silo evaluates, and LAME's settings.

    Parameters
    ----------
    methods : tuple of {"lame", "adabn"} (default: ())
        Each adds the target's test accuracy after it to its evaluation reply.
    lame_affinity : {"knn", "rbf"} (default: "knn")
        LAME's affinity of the features: 1 for the k nearest neighbours, or a Gaussian kernel.
    lame_knn : int (default: 5)
        Neighbours of the kNN affinity (the RBF's bandwidth: the mean k-th distance).
    lame_max_steps : int (default: 100)
        Most bound-optimisation updates per batch.
    lame_batch_size : int (default: 16)
        Target test inputs adapted together.
    """

    methods: tuple[str, ...] = ()
    lame_affinity: str = "knn"
    lame_knn: int = 5
    lame_max_steps: int = 100
    lame_batch_size: int = 16

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Self:
        """``tta`` in ``cfg``, validated (``ConfigError`` names the key)."""
        methods = OmegaConf.select(cfg, "tta.methods")
        require(
            OmegaConf.is_list(methods) or isinstance(methods, list | tuple),
            f"tta.methods={methods!r} is not a list (e.g. tta.methods=[lame,adabn])",
        )
        methods = tuple(methods)
        unknown = [m for m in methods if m not in METHODS]
        require(not unknown, f"tta.methods has {unknown} (known: {', '.join(METHODS)})")
        require(len(set(methods)) == len(methods), f"tta.methods has duplicates: {list(methods)}")
        return cls(
            methods=methods,
            lame_affinity=choice(cfg, "tta.lame.affinity", AFFINITIES),
            lame_knn=int(number(cfg, "tta.lame.knn")),
            lame_max_steps=int(number(cfg, "tta.lame.max_steps")),
            lame_batch_size=int(number(cfg, "tta.lame.batch_size", minimum=2)),
        )

    def to_wire(self) -> dict[str, WireValue]:
        """Keys of the target's messages; none when no method is on."""
        if not self.methods:
            return {}
        values = {**self.__dict__, "methods": ",".join(self.methods)}
        return {WIRE[name]: value for name, value in values.items()}

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> Self:
        """The settings a message's config carries (no method when it carries none)."""
        if WIRE["methods"] not in config:
            return cls()
        return cls(
            methods=tuple(m for m in str(config[WIRE["methods"]]).split(",") if m),
            lame_affinity=str(config[WIRE["lame_affinity"]]),
            lame_knn=int(config[WIRE["lame_knn"]]),
            lame_max_steps=int(config[WIRE["lame_max_steps"]]),
            lame_batch_size=int(config[WIRE["lame_batch_size"]]),
        )
