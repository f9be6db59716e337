"""Local training and evaluation loops (Flower-free, CPU or GPU)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedalign.align import mk_mmd
from fedalign.classalign import ClassStatistics, class_alignment_loss
from fedalign.disentangle import domain_adversarial_loss
from fedalign.fedsr import ReferenceDistribution, cmi_loss, l2r_loss, reparameterize
from fedalign.settings.train import OPTIMIZERS

log = logging.getLogger("fedalign.train")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one silo's local update in one round."""

    local_steps: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; otherwise the named device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def to_input(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float tensor scaled to [-1, 1]; float32 features (N, D)
    as they are."""
    tensor = torch.from_numpy(x).to(device=device, dtype=torch.float32)
    return tensor.div_(127.5).sub_(1.0) if x.dtype == np.uint8 else tensor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer '{cfg.optimizer}' (known: {', '.join(OPTIMIZERS)})")


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` mini-batches drawn from reshuffled epochs over ``n`` samples."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


@dataclass(frozen=True)
class Alignment:
    """FedKA's feature alignment term: ``weight * MK-MMD(source features, target embeddings)``.

    ``embeddings`` are the target silo's (M, D) features, fixed anchors without gradient.
    """

    embeddings: np.ndarray
    weight: float
    kernel_mul: float = 2.0
    kernel_num: int = 5


@dataclass(frozen=True)
class Adversary:
    """FedKA's features disentangler: ``weight * domain_adversarial_loss`` with a reversal scale.

    The ``discriminator`` (and its ``optimizer``) belong to the source silo and never leave it;
    ``embeddings`` are the target silo's (M, D) features, the discriminator's "target" class.
    """

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer
    embeddings: np.ndarray
    weight: float
    reversal: float


@dataclass(frozen=True)
class ClassAlignment:
    """Class-aware alignment: ``weight * class_alignment_loss`` against the target's
    class-conditional statistics (``fedalign.classalign``)."""

    stats: ClassStatistics
    weight: float


@dataclass(frozen=True)
class RepresentationRegularizers:
    """FedSR's terms: ``l2r_weight * l2r_loss(z) + cmi_weight * cmi_loss(mu, sigma, y)``
    (``fedalign.fedsr``) for a ``GaussianModel``, whose classifier then reads sampled z.

    The ``reference`` distribution (and its ``optimizer``) belong to the source silo and never
    leave it, as in the official code.
    """

    reference: ReferenceDistribution
    optimizer: torch.optim.Optimizer
    l2r_weight: float
    cmi_weight: float


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    tag: str = "",
    align: Alignment | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_scale: float = 1.0,
    proximal_mu: float = 0.0,
    adversary: Adversary | None = None,
    class_align: ClassAlignment | None = None,
    regularizers: RepresentationRegularizers | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.local_steps`` mini-batches.

    Loss per step: ``loss_scale * cross-entropy`` plus, with ``align``,
    ``align.weight * mk_mmd(features of the batch, a random batch of target embeddings)``,
    plus, with ``adversary``, ``adversary.weight * domain_adversarial_loss`` on the same batch
    of embeddings (the discriminator steps with the model), plus, with ``class_align``,
    ``class_align.weight * class_alignment_loss(features, labels)``, plus, with
    ``regularizers`` (FedSR), its L2R and CMI terms on z sampled from ``model.distribution``
    (each only when its weight is above 0; the reference steps with the model),
    plus, with ``proximal_mu > 0`` (FedProx), ``mu / 2 * ||w - w_start||^2`` over the
    parameters, where ``w_start`` are the weights the round started from.
    Pass ``optimizer`` to continue its state across rounds (else a fresh one is made).
    Returns mean training loss and accuracy, the mean of each extra term (``mmd``,
    ``domain-loss`` with the discriminator's ``domain-accuracy``, ``class-align-loss``,
    ``l2r-loss``, ``cmi-loss``) over the steps, and the wall seconds.
    """
    if len(x) < 2:
        raise ValueError(f"{tag or 'silo'}: too few training samples ({len(x)})")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = optimizer or make_optimizer(model, cfg)
    inputs, labels = to_input(x, device), torch.from_numpy(y).to(device)
    source = align.embeddings if align is not None else getattr(adversary, "embeddings", None)
    anchors = None if source is None else torch.from_numpy(source).to(device)
    if adversary is not None:
        adversary.discriminator.to(device).train()
    steppers = [optimizer] + [
        term.optimizer for term in (adversary, regularizers) if term is not None
    ]
    if regularizers is not None:
        regularizers.reference.to(device).train()
    l2r_weight = regularizers.l2r_weight if regularizers is not None else 0.0
    cmi_weight = regularizers.cmi_weight if regularizers is not None else 0.0
    start_weights = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    anchor_rng = np.random.default_rng(cfg.seed + 1)
    batch_size = min(cfg.batch_size, len(x))
    sums = dict.fromkeys(
        ("loss", "correct", "mmd", "domain", "domain-acc", "cls", "l2r", "cmi"), 0.0
    )
    seen, start = 0, time.perf_counter()
    for step, idx in enumerate(batch_indices(len(x), batch_size, cfg.local_steps, cfg.seed), 1):
        index = torch.from_numpy(idx).to(device)
        if regularizers is not None:
            mu, sigma = model.distribution(inputs[index])
            features = reparameterize(mu, sigma)
        else:
            features = model.features(inputs[index])
        logits = model.classify(features)
        loss = loss_scale * nn.functional.cross_entropy(logits, labels[index])
        if anchors is not None:
            pick = anchor_rng.choice(len(anchors), min(len(idx), len(anchors)), replace=False)
            batch_anchors = anchors[torch.from_numpy(pick).to(device)]
        if align is not None:
            mmd = mk_mmd(features, batch_anchors, align.kernel_mul, align.kernel_num)
            loss = loss + align.weight * mmd
            sums["mmd"] += mmd.item() * len(idx)
        if adversary is not None:
            domain = domain_adversarial_loss(
                adversary.discriminator, features, batch_anchors, adversary.reversal
            )
            loss = loss + adversary.weight * domain.loss
            sums["domain"] += domain.loss.item() * len(idx)
            sums["domain-acc"] += domain.accuracy * len(idx)
        if class_align is not None:
            cls = class_alignment_loss(features, labels[index], class_align.stats)
            loss = loss + class_align.weight * cls
            sums["cls"] += cls.item() * len(idx)
        if l2r_weight > 0:
            l2r = l2r_loss(features)
            loss = loss + l2r_weight * l2r
            sums["l2r"] += l2r.item() * len(idx)
        if cmi_weight > 0:
            cmi = cmi_loss(mu, sigma, labels[index], regularizers.reference)
            loss = loss + cmi_weight * cmi
            sums["cmi"] += cmi.item() * len(idx)
        if start_weights:
            drift = sum(
                (p - p0).square().sum()
                for p, p0 in zip(model.parameters(), start_weights, strict=True)
            )
            loss = loss + proximal_mu / 2 * drift
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{tag or 'silo'}: training loss became {loss.item()}")
        for stepper in steppers:
            stepper.zero_grad(set_to_none=True)
        loss.backward()
        for stepper in steppers:
            stepper.step()
        sums["loss"] += loss.item() * len(idx)
        sums["correct"] += int((logits.argmax(1) == labels[index]).sum())
        seen += len(idx)
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.local_steps):
            log.info("%s step %d/%d loss %.4f", tag, step, cfg.local_steps, sums["loss"] / seen)
    metrics = {
        "train-loss": sums["loss"] / max(seen, 1),
        "train-accuracy": sums["correct"] / max(seen, 1),
        "train-seconds": time.perf_counter() - start,
    }
    extras = {
        "mmd": (align, "mmd"),
        "domain-loss": (adversary, "domain"),
        "domain-accuracy": (adversary, "domain-acc"),
        "class-align-loss": (class_align, "cls"),
        "l2r-loss": (regularizers if l2r_weight > 0 else None, "l2r"),
        "cmi-loss": (regularizers if cmi_weight > 0 else None, "cmi"),
    }
    for name, (term, key) in extras.items():
        if term is not None:
            metrics[name] = sums[key] / max(seen, 1)
    return metrics


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The optimizer's per-parameter state (Adam moments, momentum, step) as named arrays."""
    return {
        f"{index}.{name}": value.detach().cpu().numpy().copy()
        for index, state in optimizer.state_dict()["state"].items()
        for name, value in state.items()
        if torch.is_tensor(value)
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    """Restore :func:`optimizer_state`; ValueError when it does not fit this optimizer."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        index, name = key.split(".", 1)
        # Transport turns 0-d scalars (Adam's step) into shape (1,); torch wants them 0-d.
        tensor = torch.from_numpy(np.array(value))
        state.setdefault(int(index), {})[name] = tensor.reshape(()) if name == "step" else tensor
    current = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        for name, value in entry.items():
            if value.ndim and (index >= len(params) or value.shape != params[index].shape):
                raise ValueError(f"saved optimizer state '{index}.{name}' does not fit the model")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch_size: int = 512
) -> dict[str, float]:
    """Loss and accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        inputs = to_input(x[start : start + batch_size], device)
        labels = torch.from_numpy(y[start : start + batch_size]).to(device)
        logits = model(inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    n = max(len(x), 1)
    return {"test-loss": loss_sum / n, "test-accuracy": correct / n, "num-test": len(x)}
