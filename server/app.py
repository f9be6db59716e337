"""The ServerApp: holds no data; discovers the silos, runs the strategy, writes the run folder.

Message protocol per run (Flower message types):
1. ``query.info`` to every node: domain, role, sample counts (checked against the config).
2. The strategy's rounds (``strategies/``): ``train`` to sources, ``evaluate`` /
   ``query.embed`` / ``train.vote`` to the target silo, a final ``evaluate``.
What crosses a silo boundary (README, "What crosses a silo boundary"): model weights, the
training hyper-parameters, scalar metrics, and per strategy the sources' diagonal Fishers
(``fisher``) or the target silo's M feature embeddings (``fedka``). Never samples, labels or
predictions. Every message is described in ``boundary.jsonl`` (server/audit.py).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedalign import atomic, checkpoint
from fedalign.config import compose, from_json, silos, validate
from fedalign.errors import FedalignError
from fedalign.protocol import to_config, to_record
from fedalign.runlog import RunRecorder
from fedalign.settings.catalog import strategy_settings
from fedalign.settings.tta import TTASettings
from server.audit import BoundaryAudit
from server.discovery import discover_silos
from server.grid import MeteredGrid

log = logging.getLogger("fedalign.server")
app = ServerApp()
LOG_PREFIX = "fedalign |"
OUTPUTS_ENV = "FEDALIGN_OUTPUTS"


def setup_logging() -> None:
    """Our loggers print ``fedalign | ...`` lines (the launcher shows these to the user)."""
    logger = logging.getLogger("fedalign")
    if not any(getattr(h, "_fedalign", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"{LOG_PREFIX} %(message)s"))
        handler._fedalign = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def load_config(run_config: dict[str, Any]) -> DictConfig:
    """The run's config: the launcher's resolved JSON, or conf/ defaults when run bare."""
    text = str(run_config.get("config-json", "") or "")
    cfg = from_json(text) if text else compose([])
    validate(cfg)
    return cfg


def run_dir_of(cfg: DictConfig) -> Path:
    """The launcher sets ``output.run_dir``; otherwise (``fedalign submit``, a bare ``flwr
    run``) a fresh folder under ``$FEDALIGN_OUTPUTS`` (the server side's own outputs volume in
    a container) or ``output.root``."""
    chosen = OmegaConf.select(cfg, "output.run_dir")
    if chosen:
        return Path(chosen)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = os.environ.get(OUTPUTS_ENV) or cfg.output.root
    return (Path(root) / f"{stamp}-{cfg.name}").resolve()


def run_key(run_dir: Path) -> str:
    """Names this run's state on the silos' disks; the same for a resumed run."""
    import hashlib

    return f"{run_dir.name}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]}"


def message_configs(
    cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What the silos are told: data settings, train settings, evaluate settings."""
    data = {
        "data-source": cfg.data.source,
        "data-seed": int(cfg.data.seed),
        "data-shards": int(OmegaConf.select(cfg, "data.shards", default=1)),
        "data-cache-dir": cfg.data.cache_dir,
    }
    common = {
        **data,
        "run-key": run_key(run_dir),
        "model": cfg.model.name,
        "num-classes": int(cfg.model.num_classes),
        "in-channels": int(cfg.model.in_channels),
        "device": str(cfg.device),
        "eval-batch-size": int(cfg.eval.batch_size),
        **strategy_settings(cfg).model_wire(),
        **TTASettings.from_config(cfg).to_wire(),  # read by the target silo only
    }
    train = {
        **common,
        "seed": int(cfg.seed),
        "local-steps": int(cfg.train.local_steps),
        "batch-size": int(cfg.train.batch_size),
        "lr": float(cfg.train.lr),
        "optimizer": str(cfg.train.optimizer),
        "momentum": float(cfg.train.momentum),
        "weight-decay": float(cfg.train.weight_decay),
        "log-every": int(cfg.train.log_every),
        "keep-optimizer-state": bool(cfg.train.keep_optimizer_state),
    }
    return data, train, common


def run(
    grid: Grid,
    cfg: DictConfig,
    recorder: RunRecorder,
    resume: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Discover silos, run the strategy for ``cfg.rounds`` (from a checkpoint's next round when
    ``resume`` is given), checkpoint after every round, save the final weights."""
    import numpy as np
    import torch

    from fedalign.models import get_weights
    from fedalign.wire_model import model_from_config
    from strategies.registry import build_strategy

    audit = BoundaryAudit(recorder.run_dir / "boundary.jsonl")
    metered = MeteredGrid(
        grid,
        taps=[audit],
        poll_min=float(OmegaConf.select(cfg, "federation.reply_poll_min", default=0.05)),
        poll_max=float(OmegaConf.select(cfg, "federation.reply_poll_max", default=0.25)),
        max_in_flight=int(OmegaConf.select(cfg, "federation.max_in_flight", default=0)),
    )
    data_cfg, train_cfg, eval_cfg = message_configs(cfg, recorder.run_dir)
    roster = discover_silos(metered, silos(cfg), float(cfg.federation.connect_timeout), data_cfg)
    audit.names = {node: silo.domain for node, silo in roster.items()}
    strategy = build_strategy(cfg, roster, recorder)
    torch.manual_seed(int(cfg.seed))
    model = model_from_config(eval_cfg)
    initial = to_record(get_weights(model))
    if resume is not None:
        state, groups = resume
        strategy.restore(int(state["round"]) + 1, groups)
        initial = to_record(groups["arrays"])
        torch.set_rng_state(torch.from_numpy(groups["rng"]["torch"]))
        log.info("resuming after round %d (checkpoint %s)", state["round"], checkpoint.CHECKPOINT)
    identity_text = checkpoint.identity(cfg)

    def save_checkpoint(rnd: int, arrays: Any) -> None:
        groups = {
            "arrays": {k: a.numpy() for k, a in arrays.items()},
            "rng": {"torch": torch.get_rng_state().numpy()},
            **strategy.checkpoint_groups(),
        }
        state = {"round": rnd, "config": identity_text, "recorder": recorder.state()}
        checkpoint.save(recorder.run_dir / checkpoint.CHECKPOINT, state, groups)

    strategy.on_round_end = save_checkpoint
    strategy.start(
        grid=metered,
        initial_arrays=initial,
        num_rounds=int(cfg.rounds),
        timeout=float(cfg.federation.round_timeout),
        train_config=to_config(train_cfg),
        evaluate_config=to_config(eval_cfg),
    )
    final = {name: array.numpy() for name, array in strategy.final_arrays.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **final)
    atomic.write_bytes(recorder.run_dir / "final_weights.npz", buffer.getvalue())
    return {"silos": {str(n): s.domain for n, s in roster.items()}}


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    from fedalign.tracking import start_wandb

    cfg = load_config(context.run_config)
    run_dir = run_dir_of(cfg)
    resume = None
    if bool(OmegaConf.select(cfg, "resume", default=False)):
        try:  # verified before anything in the run folder is touched
            resume = checkpoint.load_resume(cfg, run_dir)
        except FedalignError as exc:
            log.error("error: %s", exc)
            raise
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = start_wandb(config, run_dir, run_dir.name)
    recorder = RunRecorder(
        run_dir, config, cfg.data.target, tracker, state=resume[0]["recorder"] if resume else None
    )
    log.info("run folder: %s", run_dir)
    try:
        extra = run(grid, cfg, recorder, resume)
    except FedalignError as exc:
        log.error("error: %s", exc)
        recorder.finish("failed", error=str(exc))
        raise
    except KeyboardInterrupt:  # the launcher names the cause when it was a crash
        recorder.finish("interrupted", error="interrupted by Ctrl-C or SIGTERM")
        raise
    except BaseException as exc:
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    summary = recorder.finish("completed", **extra)
    log.info(
        "done: target %s accuracy %.4f after %d rounds (best %.4f), %.1f s",
        cfg.data.target,
        summary["final_target_accuracy"] or 0.0,
        summary["rounds_completed"],
        summary["best_target_accuracy"] or 0.0,
        summary["wall_seconds"],
    )
