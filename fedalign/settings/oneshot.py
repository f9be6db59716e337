"""One-shot merging's settings (conf/strategy/oneshot.yaml): one exchange, one merge.

Each source trains alone for ``local_steps`` from the server's model (``init=shared``) or from
its own seed (``init=independent``), replies once, and the server merges once: by example
count (``average``), by Fisher (``fisher``, Matena & Raffel, NeurIPS 2022), or by Fisher after
aligning every source's hidden units to the source with the most examples (``fisher_permuted``,
weight matching of Ainsworth et al., ICLR 2023: ``fedalign/permute.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedalign.settings.checks import choice, number, require
from fedalign.settings.fedavg import FedAvgSettings, WireValue
from fedalign.settings.fisher import FisherSettings

MERGES = ("average", "fisher", "fisher_permuted")
INITS = ("shared", "independent")
INDEPENDENT_INIT = "independent-init"  # wire key: each source initialises from its own seed
LOCAL_STEPS = 600  # the local compute of a 10-round x 60-step federated run (conf/config.yaml)


@dataclass(frozen=True)
class OneShotSettings(FedAvgSettings):
    """One exchange: the sources train alone, the server merges once.

    Parameters
    ----------
    merge : {"average", "fisher", "fisher_permuted"} (default: "average")
        How the server merges the source models.
    init : {"shared", "independent"} (default: "shared")
        ``shared``: every source starts from the server's model. ``independent``: the server
        sends no weights; each source initialises from its own seed (:meth:`own_init_seed`).
    local_steps : int (default: 600)
        Local mini-batches of each source, in place of ``train.local_steps``: the same local
        compute as a 10-round federated run of 60 steps a round.
    fisher : FisherSettings
        ``strategy.fisher``: the Fisher the sources send and the merge's settings (Fisher
        merges only).
    """

    name: str = "oneshot"
    merge: str = "average"
    init: str = "shared"
    local_steps: int = LOCAL_STEPS
    fisher: FisherSettings = field(default_factory=FisherSettings)

    @classmethod
    def fields_from(cls, cfg: DictConfig) -> dict[str, object]:
        from fedalign.permute import SPECS

        rounds = OmegaConf.select(cfg, "rounds")
        require(rounds == 1, f"rounds={rounds!r}: strategy=oneshot is one exchange (rounds=1)")
        merge = choice(cfg, "strategy.merge", MERGES)
        model = OmegaConf.select(cfg, "model.name")
        require(
            merge != "fisher_permuted" or model in SPECS,
            f"strategy.merge=fisher_permuted matches the hidden units of {', '.join(SPECS)} "
            f"only, not model.name={model!r}",
        )
        init = choice(cfg, "strategy.init", INITS)
        require(
            init == "shared" or OmegaConf.select(cfg, "updates.max_norm") is None,
            "updates.max_norm is a distance from the model the server sent; with "
            "strategy.init=independent it sends none",
        )
        return {
            **super().fields_from(cfg),
            "merge": merge,
            "init": init,
            "local_steps": int(number(cfg, "strategy.local_steps")),
            "fisher": FisherSettings.from_config(cfg),
        }

    @property
    def merges_by_fisher(self) -> bool:
        return self.merge != "average"

    @property
    def aligns_units(self) -> bool:
        return self.merge == "fisher_permuted"

    def to_wire(self) -> dict[str, WireValue]:
        wire: dict[str, WireValue] = {"local-steps": self.local_steps}
        if self.init == "independent":
            wire[INDEPENDENT_INIT] = True
        if self.merges_by_fisher:
            wire.update(self.fisher.to_wire())
        return wire

    @staticmethod
    def own_init_seed(config: Mapping[str, Any], silo: str) -> int | None:
        """The seed silo ``silo`` initialises its model from, or None when it starts from the
        model it was sent. Derived from the run's ``seed`` and the silo's name: silos start
        apart, and a run with the same seed starts the same.

        Parameters
        ----------
        config : Mapping
            A ``train`` message's config.
        silo : str
            The silo's name (its domain, or ``<domain>.<i>`` for a shard).
        """
        if not config.get(INDEPENDENT_INIT, False):
            return None
        return (int(config.get("seed", 0)) * 1_000_003 + zlib.crc32(f"init:{silo}".encode())) % (
            2**31
        )
