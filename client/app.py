"""The ClientApp: one domain silo. Its data never leaves it; only weights and metrics do.

Handlers (message types):
- ``query.info``: the silo's domain, role and sample counts (no data).
- ``train``: load the global weights, evaluate them on the local test split, train locally,
  reply with the new weights and metrics.
- ``evaluate``: evaluate the received weights on the local test split, reply with metrics.
Errors the operator can fix (bad node-config, missing data, mismatched model) come back to the
server as one-line error replies.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.silo import SiloIdentity, identify
from fedalign.config import ConfigError
from fedalign.data import DataError, DomainSplit, get_source
from strategies.utils import ARRAYS, CONFIG, METRICS, SILO, from_record, to_config, to_record

log = logging.getLogger("fedalign.client")
app = ClientApp()

# Error code for problems the operator can fix; Flower's own codes are below 100.
OPERATOR_ERROR = 100


def _reply_errors(handler: Callable[[Message, Context], Message]) -> Callable:
    """Turn operator errors into one-line error replies instead of tracebacks."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (ConfigError, DataError, ValueError, FloatingPointError) as exc:
            domain = context.node_config.get("domain", f"node {context.node_id}")
            log.error("silo %s: %s", domain, exc)
            return Message(Error(OPERATOR_ERROR, f"silo {domain}: {exc}"), reply_to=message)

    return wrapper


@functools.lru_cache(maxsize=4)
def _load(source: str, domain: str, cache_dir: str | None, seed: int) -> DomainSplit:
    return get_source(source, cache_dir=cache_dir, seed=seed).load(domain)


def _setup(message: Message, context: Context) -> tuple[SiloIdentity, dict[str, Any], DomainSplit]:
    silo = identify(context)
    cfg = dict(message.content[CONFIG]) if CONFIG in message.content else {}
    if silo.threads > 0:
        import torch

        torch.set_num_threads(silo.threads)
    data = _load(
        str(cfg.get("data-source", "digits5")),
        silo.domain,
        silo.data_dir or cfg.get("data-cache-dir") or None,
        int(cfg.get("data-seed", 0)),
    )
    return silo, cfg, data


def _silo_record(silo: SiloIdentity) -> Any:
    return to_config({"domain": silo.domain, "role": silo.role})


def _model(cfg: dict[str, Any], message: Message) -> Any:
    from fedalign.models import build_model, set_weights

    model = build_model(
        str(cfg["model"]), int(cfg.get("num-classes", 10)), int(cfg.get("in-channels", 3))
    )
    set_weights(model, from_record(message.content[ARRAYS]))
    return model


def _device(silo: SiloIdentity, cfg: dict[str, Any]) -> Any:
    from fedalign.train import resolve_device

    return resolve_device(silo.device or str(cfg.get("device", "auto")))


@app.query("info")
@_reply_errors
def info(message: Message, context: Context) -> Message:
    silo, _, data = _setup(message, context)
    metrics = MetricRecord({"num-train": len(data.y_train), "num-test": len(data.y_test)})
    log.info(
        "silo %s (%s): %d train / %d test samples",
        silo.domain,
        silo.role,
        len(data.y_train),
        len(data.y_test),
    )
    return Message(RecordDict({SILO: _silo_record(silo), METRICS: metrics}), reply_to=message)


@app.train()
@_reply_errors
def train(message: Message, context: Context) -> Message:
    from fedalign.models import get_weights
    from fedalign.train import TrainConfig, evaluate, train_local

    silo, cfg, data = _setup(message, context)
    if silo.role != "source":
        raise ConfigError(f"role {silo.role!r} does not train with labels; only sources do")
    model, device = _model(cfg, message), _device(silo, cfg)
    rnd = int(cfg.get("server-round", 0))
    tag = f"silo {silo.domain} round {rnd}:"
    received = evaluate(
        model, data.x_test, data.y_test, device, int(cfg.get("eval-batch-size", 512))
    )
    train_cfg = TrainConfig(
        local_steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        optimizer=str(cfg.get("optimizer", "adam")),
        momentum=float(cfg.get("momentum", 0.9)),
        weight_decay=float(cfg.get("weight-decay", 0.0)),
        seed=int(cfg.get("seed", 0)) + zlib.crc32(silo.domain.encode()) % 10_000,
        log_every=int(cfg.get("log-every", 0)),
    )
    fit = train_local(model, data.x_train, data.y_train, train_cfg, device, tag=tag)
    log.info(
        "%s trained %d steps, loss %.4f, received-model test acc %.4f",
        tag,
        train_cfg.local_steps,
        fit["train-loss"],
        received["test-accuracy"],
    )
    metrics = MetricRecord(
        {
            "num-examples": len(data.y_train),
            **fit,
            "received-test-accuracy": received["test-accuracy"],
            "received-test-loss": received["test-loss"],
            "num-test": len(data.y_test),
        }
    )
    content = RecordDict(
        {
            ARRAYS: to_record(get_weights(model)),
            METRICS: metrics,
            SILO: _silo_record(silo),
        }
    )
    return Message(content, reply_to=message)


@app.evaluate()
@_reply_errors
def evaluate_global(message: Message, context: Context) -> Message:
    from fedalign.train import evaluate

    silo, cfg, data = _setup(message, context)
    model, device = _model(cfg, message), _device(silo, cfg)
    result = evaluate(model, data.x_test, data.y_test, device, int(cfg.get("eval-batch-size", 512)))
    log.info(
        "silo %s round %s: test acc %.4f",
        silo.domain,
        cfg.get("server-round"),
        result["test-accuracy"],
    )
    metrics = MetricRecord({"num-examples": len(data.y_test), **result})
    return Message(RecordDict({METRICS: metrics, SILO: _silo_record(silo)}), reply_to=message)
