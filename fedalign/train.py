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
    """uint8 images (N, C, H, W) -> float tensor scaled to [-1, 1]."""
    return torch.from_numpy(x).to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer '{cfg.optimizer}' (known: adam, sgd)")


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` mini-batches drawn from reshuffled epochs over ``n`` samples."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    tag: str = "",
) -> dict[str, float]:
    """Train ``model`` in place with cross-entropy for ``cfg.local_steps`` mini-batches.

    Returns the mean training loss and accuracy over the steps, and the wall seconds.
    """
    if len(x) < 2:
        raise ValueError(f"{tag or 'silo'}: too few training samples ({len(x)})")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    inputs, labels = to_input(x, device), torch.from_numpy(y).to(device)
    batch_size = min(cfg.batch_size, len(x))
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for step, idx in enumerate(batch_indices(len(x), batch_size, cfg.local_steps, cfg.seed), 1):
        index = torch.from_numpy(idx).to(device)
        logits = model(inputs[index])
        loss = nn.functional.cross_entropy(logits, labels[index])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{tag or 'silo'}: training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == labels[index]).sum())
        seen += len(idx)
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.local_steps):
            log.info("%s step %d/%d loss %.4f", tag, step, cfg.local_steps, loss_sum / seen)
    return {
        "train-loss": loss_sum / max(seen, 1),
        "train-accuracy": correct / max(seen, 1),
        "train-seconds": time.perf_counter() - start,
    }


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
