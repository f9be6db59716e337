"""A source silo's round: evaluate the received model, train (aligned to the target), reply."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import adversary as disentangler
from client import runtime, state
from fedalign.config import ConfigError
from strategies.utils import (
    ARRAYS,
    CLASS_STATS,
    EMBEDDINGS,
    FISHER,
    FISHER_SCALE,
    METRICS,
    SILO,
    from_record,
    to_record,
)

log = logging.getLogger("fedalign.client")
OPTIMIZER = "optimizer"  # Context.state keys: the local optimizer survives across rounds
OPTIMIZER_META = "optimizer-meta"
BATCHNORM = "local-batchnorm"  # FedBN: this silo's BatchNorm weights and statistics


def train(message: Message, context: Context) -> Message:
    from fedalign.classalign import ClassStatistics
    from fedalign.models import get_weights
    from fedalign.train import Alignment, ClassAlignment, evaluate, make_optimizer, train_local

    silo, cfg, data = runtime.setup(message, context)
    if silo.role != "source":
        raise ConfigError(f"role {silo.role!r} does not train with labels; only sources do")
    model = runtime.build(cfg, message.content[ARRAYS])
    tag = f"silo {silo.domain} round {cfg.get('server-round', 0)}:"
    state.ensure(context, silo, cfg, tag)
    local_batchnorm = bool(cfg.get("local-batchnorm", False))
    if local_batchnorm:
        restore_batchnorm(context, model)
    device = runtime.device(silo, cfg)
    model.to(device)
    received = evaluate(model, data.x_test, data.y_test, device, runtime.eval_batch(cfg))
    train_cfg = runtime.train_config(cfg, silo)
    optimizer = make_optimizer(model, train_cfg)
    if cfg.get("keep-optimizer-state", True):
        restore_optimizer(context, optimizer, cfg, tag)
    align = adversary = class_align = None
    if EMBEDDINGS in message.content.array_records:
        embeddings = from_record(message.content[EMBEDDINGS])[EMBEDDINGS].astype(np.float32)
        if float(cfg.get("mmd-weight", 0.0)) > 0:
            align = Alignment(
                embeddings=embeddings,
                weight=float(cfg["mmd-weight"]),
                kernel_mul=float(cfg.get("kernel-mul", 2.0)),
                kernel_num=int(cfg.get("kernel-num", 5)),
            )
        adversary = disentangler.build(context, embeddings, cfg, train_cfg, tag)
    if CLASS_STATS in message.content.array_records and float(cfg.get("class-align-weight", 0)) > 0:
        class_align = ClassAlignment(
            stats=ClassStatistics.from_arrays(from_record(message.content[CLASS_STATS])),
            weight=float(cfg["class-align-weight"]),
        )
    fit = train_local(
        model,
        data.x_train,
        data.y_train,
        train_cfg,
        device,
        tag,
        align=align,
        optimizer=optimizer,
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        adversary=adversary,
        class_align=class_align,
    )
    if adversary is not None:
        disentangler.save(context, adversary)
    if cfg.get("keep-optimizer-state", True):
        save_optimizer(context, optimizer, cfg)
    if local_batchnorm:
        save_batchnorm(context, model)
    state.persist(context, silo, cfg)
    log.info(
        "%s trained %d steps, loss %.4f%s, received-model test acc %.4f",
        tag,
        train_cfg.local_steps,
        fit["train-loss"],
        extra_terms(fit),
        received["test-accuracy"],
    )
    metrics = {
        "num-examples": len(data.y_train),
        **fit,
        "received-test-accuracy": received["test-accuracy"],
        "received-test-loss": received["test-loss"],
    }
    content = RecordDict(
        {
            ARRAYS: to_record(get_weights(model)),
            METRICS: MetricRecord(metrics),
            SILO: runtime.silo_record(silo),
        }
    )
    if cfg.get("fisher", False):
        attach_fisher(content, model, data, cfg, device, train_cfg.seed, tag)
    return Message(content, reply_to=message)


def extra_terms(fit: dict[str, float]) -> str:
    """The log's summary of the alignment terms this round trained with."""
    names = ("mmd", "domain-loss", "domain-accuracy", "class-align-loss")
    return "".join(f", {name} {fit[name]:.4f}" for name in names if name in fit)


def attach_fisher(
    content: RecordDict, model: object, data: object, cfg: dict, device: object, seed: int, tag: str
) -> None:
    """Add the diagonal Fisher of the trained model (and its cost) to the reply."""
    import time

    import numpy as np
    import torch

    from fedalign.fisher import diagonal_fisher, pack_float16
    from fedalign.train import to_input

    mode, count = str(cfg.get("fisher-mode", "exact")), int(cfg.get("fisher-samples", 512))
    idx = np.random.default_rng(seed).permutation(len(data.x_train))[:count]
    x, y = data.x_train[idx], data.y_train[idx]
    batches = [
        (to_input(x[i : i + 128], device), torch.from_numpy(y[i : i + 128]).to(device))
        for i in range(0, len(x), 128)
    ]
    start = time.perf_counter()
    fisher = diagonal_fisher(model, batches, mode=mode, n_examples=count, device=device, seed=seed)
    seconds = time.perf_counter() - start
    if cfg.get("fisher-transport", "float32") == "float16":
        halves, scales = pack_float16(fisher)
        content[FISHER], content[FISHER_SCALE] = to_record(halves), to_record(scales)
    else:
        content[FISHER] = to_record(fisher)
    content[METRICS]["fisher-seconds"] = seconds
    log.info("%s %s Fisher of %d examples in %.2f s", tag, mode, len(x), seconds)


def _meta(cfg: dict) -> dict[str, str]:
    return {"model": str(cfg["model"]), "optimizer": str(cfg.get("optimizer", "adam"))}


def restore_optimizer(context: Context, optimizer: object, cfg: dict, tag: str) -> None:
    from fedalign.train import load_optimizer_state

    state = context.state
    if OPTIMIZER not in state or dict(state[OPTIMIZER_META]) != _meta(cfg):
        return
    try:
        load_optimizer_state(optimizer, from_record(state[OPTIMIZER]))
    except ValueError as exc:
        log.warning("%s starting a fresh optimizer: %s", tag, exc)


def save_optimizer(context: Context, optimizer: object, cfg: dict) -> None:
    from fedalign.train import optimizer_state

    context.state[OPTIMIZER] = to_record(optimizer_state(optimizer))
    context.state[OPTIMIZER_META] = ConfigRecord(_meta(cfg))


def restore_batchnorm(context: Context, model: object) -> None:
    """FedBN: put this silo's own BatchNorm entries into the received global model."""
    from fedalign.models import get_weights, set_weights

    if BATCHNORM in context.state:
        set_weights(model, {**get_weights(model), **from_record(context.state[BATCHNORM])})


def save_batchnorm(context: Context, model: object) -> None:
    from fedalign.models import batchnorm_names, get_weights

    names = batchnorm_names(model)
    context.state[BATCHNORM] = to_record(
        {k: v for k, v in get_weights(model).items() if k in names}
    )
