"""A source silo's round: evaluate the received model (or, one-shot from independent starts, its
own freshly initialised one), train (aligned to the target), reply."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import adversary as disentangler
from client import reference, runtime, state
from fedalign.config import ConfigError
from fedalign.protocol import (
    ARRAYS,
    CLASS_STATS,
    EMBEDDINGS,
    FISHER,
    FISHER_SCALE,
    METRICS,
    SILO,
    TRAINED_ACCURACY,
    TRAINED_LOSS,
    from_record,
    to_record,
)
from fedalign.settings.fedbn import FedBNSettings
from fedalign.settings.feddg_ga import FedDGGASettings
from fedalign.settings.fedka import SourceAlignment
from fedalign.settings.fedprox import FedProxSettings
from fedalign.settings.fedsr import FedSRSettings
from fedalign.settings.fisher import FisherSettings
from fedalign.settings.oneshot import OneShotSettings

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
    tag = f"silo {silo.domain} round {cfg.get('server-round', 0)}:"
    own_seed = OneShotSettings.own_init_seed(cfg, silo.domain)
    if own_seed is None:
        model = runtime.build(cfg, message.content[ARRAYS])
    else:  # one-shot merging from independent starts: the server sent no weights
        model = runtime.initialise(cfg, own_seed)
        log.info("%s initialised its own model (seed %d)", tag, own_seed)
    state.ensure(context, silo, cfg, tag)
    local_batchnorm = FedBNSettings.from_wire(cfg) is not None
    prox = FedProxSettings.from_wire(cfg)
    fedsr = FedSRSettings.from_wire(cfg)
    wanted = SourceAlignment.from_wire(cfg)
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
        if wanted.mmd_weight > 0:
            align = Alignment(
                embeddings=embeddings,
                weight=wanted.mmd_weight,
                kernel_mul=wanted.kernel_mul,
                kernel_num=wanted.kernel_num,
            )
        adversary = disentangler.build(context, embeddings, wanted, train_cfg, tag)
    if CLASS_STATS in message.content.array_records and wanted.class_align_weight > 0:
        class_align = ClassAlignment(
            stats=ClassStatistics.from_arrays(from_record(message.content[CLASS_STATS])),
            weight=wanted.class_align_weight,
        )
    regularizers = None
    if fedsr is not None:
        num_classes = int(cfg.get("num-classes", 10))
        regularizers = reference.build(context, fedsr, num_classes, model.z_dim, train_cfg, tag)
    fit = train_local(
        model,
        data.x_train,
        data.y_train,
        train_cfg,
        device,
        tag,
        align=align,
        optimizer=optimizer,
        proximal_mu=prox.proximal_mu if prox is not None else 0.0,
        adversary=adversary,
        class_align=class_align,
        regularizers=regularizers,
    )
    if adversary is not None:
        disentangler.save(context, adversary)
    if regularizers is not None:
        reference.save(context, regularizers)
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
    if FedDGGASettings.from_wire(cfg) is not None:  # the local side of the generalization gap
        local = evaluate(model, data.x_test, data.y_test, device, runtime.eval_batch(cfg))
        metrics[TRAINED_ACCURACY] = local["test-accuracy"]
        metrics[TRAINED_LOSS] = local["test-loss"]
    content = RecordDict(
        {
            ARRAYS: to_record(get_weights(model)),
            METRICS: MetricRecord(metrics),
            SILO: runtime.silo_record(silo),
        }
    )
    fisher = FisherSettings.from_wire(cfg)
    if fisher is not None:
        attach_fisher(content, model, data, fisher, device, train_cfg.seed, tag)
    return Message(content, reply_to=message)


def extra_terms(fit: dict[str, float]) -> str:
    """The log's summary of the alignment terms this round trained with."""
    names = ("mmd", "domain-loss", "domain-accuracy", "class-align-loss", "l2r-loss", "cmi-loss")
    return "".join(f", {name} {fit[name]:.4f}" for name in names if name in fit)


def attach_fisher(
    content: RecordDict,
    model: object,
    data: object,
    fisher_settings: FisherSettings,
    device: object,
    seed: int,
    tag: str,
) -> None:
    """Add the diagonal Fisher of the trained model (and its cost) to the reply.

    Parameters
    ----------
    content : RecordDict
        The reply being built; gets ``fisher`` (and ``fisher-scale`` in float16).
    model : nn.Module
        The trained model.
    data : DomainSplit
        The silo's data; the Fisher is estimated on a sample of its training split.
    fisher_settings : FisherSettings
        Mode, sample count and transport, as the ``train`` config asked.
    device : torch.device
        Where to compute.
    seed : int
        Picks the sample.
    tag : str
        Log prefix naming the silo and round.
    """
    import time

    import numpy as np
    import torch

    from fedalign.fisher import diagonal_fisher, pack_float16
    from fedalign.train import to_input

    mode, count = fisher_settings.mode, fisher_settings.samples
    idx = np.random.default_rng(seed).permutation(len(data.x_train))[:count]
    x, y = data.x_train[idx], data.y_train[idx]
    batches = [
        (to_input(x[i : i + 128], device), torch.from_numpy(y[i : i + 128]).to(device))
        for i in range(0, len(x), 128)
    ]
    start = time.perf_counter()
    fisher = diagonal_fisher(model, batches, mode=mode, n_examples=count, device=device, seed=seed)
    seconds = time.perf_counter() - start
    if fisher_settings.transport == "float16":
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
