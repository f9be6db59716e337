"""What every handler needs: the silo, its data, the model and the training settings."""

from __future__ import annotations

import functools
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from client.silo import SiloIdentity, identify
from fedalign.config import ConfigError, parse_shard
from fedalign.data import DomainSplit, get_source
from fedalign.protocol import CONFIG, METRICS, from_record, to_config


@functools.lru_cache(maxsize=8)
def load_domain(source: str, domain: str, cache_dir: str | None, seed: int) -> DomainSplit:
    return get_source(source, cache_dir=cache_dir, seed=seed).load(domain)


def load_data(source: str, silo: str, cache_dir: str | None, seed: int, shards: int) -> DomainSplit:
    """The silo's data: its domain, or for a shard silo ``<domain>.<i>`` part i of ``shards``
    of the domain's training data (the test split stays whole)."""
    domain, index = parse_shard(silo) if shards > 1 else (silo, None)  # a site may be "lab.2"
    data = load_domain(source, domain, cache_dir, seed)
    if index is None:
        return data
    if index >= shards:
        raise ConfigError(f"silo {silo}: shard {index} but the run has data.shards={shards}")
    return data.shard(index, shards, seed)


def setup(message: Message, context: Context) -> tuple[SiloIdentity, dict[str, Any], DomainSplit]:
    """This silo's identity, the message's config, and the silo's own data."""
    silo = identify(context)
    cfg = dict(message.content[CONFIG]) if CONFIG in message.content else {}
    fresh, started = "torch" not in sys.modules, time.time()
    import torch

    if fresh:  # the first message of this process paid for it
        _IMPORT_SECONDS[0] = time.time() - started
    if silo.threads > 0:
        torch.set_num_threads(silo.threads)
    data = load_data(
        silo.data_source or str(cfg.get("data-source", "digits5")),
        silo.domain,
        silo.data_dir or cfg.get("data-cache-dir") or None,
        int(cfg.get("data-seed", 0)),
        int(cfg.get("data-shards", 1)),
    )
    return silo, cfg, data


def silo_record(silo: SiloIdentity) -> ConfigRecord:
    return to_config({"domain": silo.domain, "role": silo.role})


def build(cfg: dict[str, Any], arrays: ArrayRecord) -> Any:
    """The configured model with ``arrays`` loaded (ValueError if they do not fit)."""
    from fedalign.models import set_weights
    from fedalign.wire_model import model_from_config

    model = model_from_config(cfg)
    set_weights(model, from_record(arrays))
    return model


def initialise(cfg: dict[str, Any], seed: int) -> Any:
    """The configured model, freshly initialised from ``seed`` (a source's own start)."""
    from fedalign.models import seeded_model

    return seeded_model(
        str(cfg["model"]), int(cfg.get("num-classes", 10)), int(cfg.get("in-channels", 3)), seed
    )


def device(silo: SiloIdentity, cfg: dict[str, Any]) -> Any:
    from fedalign.train import resolve_device

    return resolve_device(silo.device or str(cfg.get("device", "auto")))


def train_config(cfg: dict[str, Any], silo: SiloIdentity) -> Any:
    """Local-update settings from the message; the seed differs per silo and round."""
    from fedalign.train import TrainConfig

    seed = int(cfg.get("seed", 0)) * 1_000_003 + int(cfg.get("server-round", 0)) * 7_919
    return TrainConfig(
        local_steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        optimizer=str(cfg.get("optimizer", "adam")),
        momentum=float(cfg.get("momentum", 0.9)),
        weight_decay=float(cfg.get("weight-decay", 0.0)),
        seed=(seed + zlib.crc32(silo.domain.encode())) % 2**31,
        log_every=int(cfg.get("log-every", 0)),
    )


def eval_batch(cfg: dict[str, Any]) -> int:
    return int(cfg.get("eval-batch-size", 512))


def process_started() -> float | None:
    """This process's start (epoch seconds) from /proc, or None where there is no /proc."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in lines if line.startswith("btime"))
    except (OSError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


_FIRST_MESSAGE = [True]
_IMPORT_SECONDS = [0.0]  # seconds this process spent importing torch (the largest start-up cost)


def timed(reply: Message, entered: float) -> Message:
    """Add ``handler-seconds`` to the reply's metrics (how long the silo worked), and for a
    process's first message ``start-seconds`` (process start to handler) and
    ``import-seconds`` (the part of the handler spent importing torch)."""
    first, _FIRST_MESSAGE[0] = _FIRST_MESSAGE[0], False
    if reply.has_error() or METRICS not in reply.content.metric_records:
        return reply
    metrics = reply.content[METRICS]
    metrics["handler-seconds"] = time.time() - entered
    started = process_started() if first else None
    if started is not None:
        metrics["start-seconds"] = max(0.0, entered - started)
        metrics["import-seconds"] = _IMPORT_SECONDS[0]
    return reply
