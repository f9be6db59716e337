"""Weights & Biases tracking: offline unless the user configures a key or a mode."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fedalign.tracking")


def wandb_mode(configured: str) -> str:
    """``auto`` means online when ``WANDB_API_KEY`` is set, offline otherwise."""
    if configured != "auto":
        return configured
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def start_wandb(config: dict[str, Any], run_dir: Path, name: str) -> Any:
    """Start a W&B run writing under ``run_dir/wandb``; None when disabled."""
    settings = config.get("wandb", {})
    mode = wandb_mode(str(settings.get("mode", "auto")))
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=settings.get("project", "fedalign"),
        entity=settings.get("entity"),
        name=name,
        dir=str(run_dir),
        mode=mode,
        config=config,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    log.info("W&B run %s (%s) in %s", run.id, mode, run_dir / "wandb")
    return run
