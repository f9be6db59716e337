"""The target silo (FedKA's global workspace): evaluate, vote, fine-tune, embed.

What leaves this silo: the fine-tuned model weights, M embeddings of random target
training inputs (features of the global model, FedKA's alignment anchors; only when MK-MMD or
the disentangler is on), with class-aware alignment on the class-conditional statistics of the
voted samples' features under their pseudo-labels (C means, D pooled variances, a C-long mask),
and scalar metrics. Target images, target labels, pseudo-labels and per-sample predictions stay
here. With ``tta.methods`` on (any strategy), each evaluation reply also carries the test
accuracy after each test-time adaptation (``adapted_accuracies``): the adapted predictions and
BatchNorm statistics stay here too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from client import runtime
from fedalign.config import ConfigError
from fedalign.protocol import (
    ARRAYS,
    CLASS_STATS,
    EMBEDDINGS,
    METRICS,
    SILO,
    from_record,
    source_domain,
    to_record,
)
from fedalign.settings.fedka import TargetRound
from fedalign.settings.tta import LABELS, TTASettings, metric_key

log = logging.getLogger("fedalign.client")
STAT_KEYS = ("agreement", "kept_fraction", "pseudo_label_accuracy")  # vote statistics reported


def _require_target(role: str) -> None:
    if role != "target":
        raise ConfigError(f"role {role!r} cannot serve target requests; only the target silo does")


def adapted_accuracies(
    model: Any, data: Any, cfg: dict[str, Any], device: Any, tag: str
) -> dict[str, float]:
    """The target's test accuracy after each test-time adaptation the message's config enables
    (``fedalign.settings.tta``): LAME on the test split's batches; AdaBN with BatchNorm
    statistics re-estimated on the unlabelled training split. ``model`` is not modified."""
    from fedalign.train import evaluate
    from fedalign.tta import adabn, lame_predict

    wanted = TTASettings.from_wire(cfg)
    accuracies = {}
    for method in wanted.methods:
        if method == "lame":
            labels = lame_predict(
                model,
                data.x_test,
                device,
                wanted.lame_affinity,
                wanted.lame_knn,
                wanted.lame_max_steps,
                wanted.lame_batch_size,
            )
            accuracy = float(np.mean(labels == data.y_test))
        elif method == "adabn":
            batch = runtime.eval_batch(cfg)
            adapted = adabn(model, data.x_train, device, batch)
            accuracy = evaluate(adapted, data.x_test, data.y_test, device, batch)["test-accuracy"]
        else:
            raise ConfigError(f"unknown test-time adaptation {method!r} in tta.methods")
        accuracies[metric_key(method)] = accuracy
    if accuracies:
        log.info(
            "%s target test acc after %s",
            tag,
            ", ".join(f"{LABELS[m]} {accuracies[metric_key(m)]:.4f}" for m in wanted.methods),
        )
    return accuracies


def _embeddings(
    model: Any, data: Any, cfg: dict[str, Any], wanted: TargetRound, device: Any
) -> dict[str, Any]:
    from fedalign.workspace import embed, sample_indices

    count = wanted.embed_samples
    if count <= 0:
        return {}
    seed = int(cfg.get("seed", 0)) * 1_000_003 + int(cfg.get("server-round", 0)) + 17
    idx = sample_indices(len(data.x_train), count, seed)
    features = embed(model, data.x_train[idx], device)
    if wanted.embed_transport == "float16":  # half the bytes; sources widen them
        limit = np.finfo(np.float16).max
        features = np.clip(features, -limit, limit).astype(np.float16)
    return {EMBEDDINGS: to_record({EMBEDDINGS: features})}


def _class_stats(
    model: Any, x: np.ndarray, labels: np.ndarray, cfg: dict[str, Any], min_count: int, device: Any
) -> dict[str, Any]:
    """Class-conditional statistics of the voted samples' features, when class alignment is on."""
    from fedalign.classalign import class_statistics
    from fedalign.workspace import embed

    if min_count <= 0 or len(labels) == 0:
        return {}
    stats = class_statistics(
        embed(model, x, device), labels, int(cfg.get("num-classes", 10)), min_count
    )
    return {} if stats is None else {CLASS_STATS: to_record(stats.to_arrays())}


def embed_and_evaluate(message: Message, context: Context) -> Message:
    """``query.embed``: evaluate the received model on the target test split and embed."""
    from fedalign.train import evaluate

    silo, cfg, data = runtime.setup(message, context)
    _require_target(silo.role)
    model = runtime.build(cfg, message.content[ARRAYS])
    device = runtime.device(silo, cfg)
    result = evaluate(model, data.x_test, data.y_test, device, runtime.eval_batch(cfg))
    tag = f"silo {silo.domain} round {cfg.get('server-round')}:"
    log.info("%s target test acc %.4f", tag, result["test-accuracy"])
    adapted = adapted_accuracies(model, data, cfg, device, tag)
    content = RecordDict(
        {
            METRICS: MetricRecord({"num-examples": len(data.y_test), **result, **adapted}),
            SILO: runtime.silo_record(silo),
            **_embeddings(model, data, cfg, TargetRound.from_wire(cfg), device),
        }
    )
    return Message(content, reply_to=message)


def vote_and_fine_tune(message: Message, context: Context) -> Message:
    """``train.vote``: vote pseudo-labels with the source models, fine-tune, evaluate, embed."""
    from fedalign.models import get_weights
    from fedalign.train import evaluate
    from fedalign.workspace import VoteConfig, fine_tune, pseudo_label, sample_indices

    silo, cfg, data = runtime.setup(message, context)
    _require_target(silo.role)
    device = runtime.device(silo, cfg)
    batch = runtime.eval_batch(cfg)
    model = runtime.build(cfg, message.content[ARRAYS])
    sources = {
        domain: runtime.build(cfg, record)
        for key, record in message.content.array_records.items()
        if (domain := source_domain(key))
    }
    if not sources:
        raise ValueError("train.vote carried no source models")
    rnd = int(cfg.get("server-round", 0))
    wanted = TargetRound.from_wire(cfg)
    vote_cfg = VoteConfig(
        samples=wanted.vote_samples,
        soft=wanted.soft_vote,
        min_agreement=wanted.min_agreement,
        finetune_steps=wanted.finetune_steps,
        target_stats=wanted.vote_target_stats,
    )
    start = time.perf_counter()
    idx = sample_indices(len(data.x_train), vote_cfg.samples, int(cfg.get("seed", 0)) + rnd)
    labels, mask, stats = pseudo_label(
        sources, data.x_train[idx], device, vote_cfg, data.y_train[idx]
    )
    source_acc = {
        f"model-{domain}-test-accuracy": evaluate(m, data.x_test, data.y_test, device, batch)[
            "test-accuracy"
        ]
        for domain, m in sources.items()
    }
    averaged = evaluate(model, data.x_test, data.y_test, device, batch)
    vote_seconds = time.perf_counter() - start
    tag = f"silo {silo.domain} round {rnd}:"
    alpha = wanted.alpha
    voted_x, voted = data.x_train[idx][mask], labels[mask]
    # The statistics describe the feature space the sources start the next round in.
    starts_averaged = wanted.start_from == "averaged"
    min_count = wanted.class_min_count
    class_stats = (
        _class_stats(model, voted_x, voted, cfg, min_count, device) if starts_averaged else {}
    )
    tuned = fine_tune(
        model,
        voted_x,
        voted,
        runtime.train_config(cfg, silo),
        vote_cfg.finetune_steps,
        alpha,
        device,
        tag,
    )
    if not starts_averaged:
        class_stats = _class_stats(model, voted_x, voted, cfg, min_count, device)
    result = evaluate(model, data.x_test, data.y_test, device, batch)
    metrics = {
        "num-examples": int(mask.sum()),
        **result,
        **adapted_accuracies(model, data, cfg, device, tag),
        "averaged-test-accuracy": averaged["test-accuracy"],
        "group-effect": averaged["test-accuracy"] - float(np.mean(list(source_acc.values()))),
        **{k: v for k, v in stats.items() if k in STAT_KEYS},
        **source_acc,
        **tuned,
        "alpha": alpha,
        "vote-seconds": vote_seconds,
    }
    if class_stats:
        present = from_record(class_stats[CLASS_STATS])["present"]
        metrics["class-stats-classes"] = int(present.sum())
    log.info(
        "%s vote agreement %.3f, kept %.3f, pseudo-label acc %s; target acc averaged %.4f -> "
        "fine-tuned %.4f",
        tag,
        stats["agreement"],
        stats["kept_fraction"],
        f"{stats['pseudo_label_accuracy']:.4f}" if "pseudo_label_accuracy" in stats else "n/a",
        averaged["test-accuracy"],
        result["test-accuracy"],
    )
    content = RecordDict(
        {
            ARRAYS: to_record(get_weights(model)),
            METRICS: MetricRecord({k.replace("_", "-"): float(v) for k, v in metrics.items()}),
            SILO: runtime.silo_record(silo),
            **_embeddings(model, data, cfg, wanted, device),
            **class_stats,
        }
    )
    return Message(content, reply_to=message)
