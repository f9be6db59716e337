"""FedKA's global workspace, run inside the target silo (Flower-free).

The target silo holds the unlabelled training data of the unseen domain. Per round it
1. predicts target samples with every source model and votes pseudo-labels (``pseudo_label``),
2. fine-tunes the aggregated model on the kept pseudo-labels, loss scaled by alpha
   (``fine_tune``),
3. embeds M random target samples with the resulting model (``embed``): these embeddings are
   what the sources align their features to in the next round.
Labels of the target training split are used for one diagnostic only: pseudo-label accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedalign.train import TrainConfig, to_input, train_local
from fedalign.vote import vote, vote_stats


@dataclass(frozen=True)
class VoteConfig:
    """How the target silo votes and fine-tunes in one round."""

    samples: int = 2048
    soft: bool = False
    min_agreement: float = 0.0
    finetune_steps: int = 32
    target_stats: bool = False


@torch.no_grad()
def embed(
    model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 512
) -> np.ndarray:
    """Features of ``x`` under ``model`` in eval mode: (N, D) float32."""
    model.to(device).eval()
    chunks = [
        model.features(to_input(x[i : i + batch_size], device)).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm layers normalise with the statistics of
    the batch they see (AdaBN). Source models voting this way adapt their normalisation to the
    target domain; the FedKA notebook votes in train mode, which has the same effect on BatchNorm
    (and also keeps dropout on)."""
    adapted = copy.deepcopy(model).eval()
    for module in adapted.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return adapted


@torch.no_grad()
def predict(
    models: Mapping[str, nn.Module],
    x: np.ndarray,
    device: torch.device,
    soft: bool = False,
    batch_size: int = 512,
    target_stats: bool = False,
) -> np.ndarray:
    """Every model's prediction on ``x``: K x N labels, or K x N x C probabilities if soft.

    With ``target_stats``, BatchNorm uses each batch's own statistics (``with_batch_statistics``);
    the models passed in are not modified."""
    outputs = []
    for model in models.values():
        model = with_batch_statistics(model) if target_stats else model.eval()
        model.to(device)
        logits = torch.cat(
            [
                model(to_input(x[i : i + batch_size], device)).cpu()
                for i in range(0, len(x), batch_size)
            ]
        )
        outputs.append(logits.softmax(1) if soft else logits.argmax(1))
    return torch.stack(outputs).numpy()


def sample_indices(n: int, count: int, seed: int) -> np.ndarray:
    """``min(count, n)`` distinct indices out of ``n``, seeded."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))


def pseudo_label(
    models: Mapping[str, nn.Module],
    x: np.ndarray,
    device: torch.device,
    cfg: VoteConfig,
    truth: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Vote the source models' predictions on ``x``: (labels, kept mask, vote statistics)."""
    predictions = predict(models, x, device, soft=cfg.soft, target_stats=cfg.target_stats)
    labels, mask = vote(predictions, soft=cfg.soft, min_agreement=cfg.min_agreement)
    stats = vote_stats(predictions, labels, mask, truth=truth, soft=cfg.soft)
    return labels, mask, stats


def fine_tune(
    model: nn.Module,
    x: np.ndarray,
    labels: np.ndarray,
    train_cfg: TrainConfig,
    steps: int,
    alpha: float,
    device: torch.device,
    tag: str = "",
) -> dict[str, float]:
    """Train ``model`` on pseudo-labelled ``x`` for ``steps`` batches, loss scaled by alpha."""
    if len(x) < 2 or steps < 1 or alpha <= 0:
        return {"finetune-steps": 0}
    cfg = TrainConfig(**{**train_cfg.__dict__, "local_steps": steps, "log_every": 0})
    metrics = train_local(model, x, labels, cfg, device, tag=tag, loss_scale=alpha)
    return {"finetune-loss": metrics["train-loss"], "finetune-steps": steps}
