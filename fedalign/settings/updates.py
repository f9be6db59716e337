"""Checks and aggregation of the sources' train replies (``updates`` in conf/config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from omegaconf import DictConfig, OmegaConf

from fedalign.settings.checks import choice, number, require

ROBUST = ("none", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class UpdateSettings:
    """How the server checks and combines train replies, for every strategy.

    Parameters
    ----------
    max_norm : float or None (default: None)
        Drop an update farther than this (L2) from the global model.
    robust : {"none", "median", "trimmed_mean", "krum"} (default: "none")
        Flower's FedMedian, FedTrimmedAvg or Krum in place of the weighted average.
    trim_beta : float (default: 0.2)
        trimmed_mean: fraction cut at each end, in [0, 0.5).
    num_malicious : int (default: 1)
        krum: silos assumed malicious.
    """

    max_norm: float | None = None
    robust: str = "none"
    trim_beta: float = 0.2
    num_malicious: int = 1

    @classmethod
    def from_config(cls, cfg: DictConfig, merges_by_fisher: bool) -> Self:
        """``updates`` in ``cfg``, validated against the strategy (``ConfigError``).

        Parameters
        ----------
        cfg : DictConfig
            The composed config.
        merges_by_fisher : bool
            Whether the strategy merges by Fisher, which no robust average replaces.
        """
        max_norm = None
        if OmegaConf.select(cfg, "updates.max_norm") is not None:
            max_norm = float(number(cfg, "updates.max_norm", float, minimum=1e-12))
        robust = choice(cfg, "updates.robust", ROBUST)
        beta = float(number(cfg, "updates.trim_beta", float, minimum=0))
        require(beta < 0.5, f"updates.trim_beta={beta} must be in [0, 0.5)")
        malicious = int(number(cfg, "updates.num_malicious", minimum=0))
        require(
            robust == "none" or not merges_by_fisher,
            f"updates.robust={robust} replaces a weighted average, but strategy "
            f"{cfg.strategy.name} merges by Fisher; use updates.robust=none with it",
        )
        return cls(max_norm, robust, beta, malicious)
