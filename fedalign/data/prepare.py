"""Data a run needs before its silos start: the embedded benchmark's domains, built or verified."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedalign.config import external_silos
from fedalign.data.cache import build_all


def ensure_data(cfg: Any, echo: Callable[[str], Any]) -> None:
    """Build (or verify) the cached Digits-5 domains of the silos this machine runs.

    Parameters
    ----------
    cfg : DictConfig
        The run's config; nothing is done unless ``data.source`` is ``digits5``. Silos that join
        from elsewhere (``federation.external_silos``) bring their own data.
    echo : callable
        Prints one line for the user.
    """
    if cfg.data.source != "digits5":
        return
    local = tuple(d for d in cfg.data.domains if d not in external_silos(cfg))
    echo(f"data: Digits-5 domains {list(local)} (cache: {cfg.data.cache_dir or 'default'})")
    build_all(cache_dir=cfg.data.cache_dir, seed=int(cfg.data.seed), domains=local)
