"""FedKA's features disentangler without target images (Flower-free).

The FedKA notebook puts a domain classifier behind a gradient-reversal layer on the feature
extractor and trains it on every client's own images and on *target images*. Here the
discriminator separates a source's own features from the target silo's embeddings, which the
sources already receive; its reversed gradient pushes the source encoder toward features the
discriminator cannot tell from the target's. No target image, label or new array reaches a
source, and the discriminator never leaves the source silo (docs/validation.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SOURCE, TARGET = 0, 1  # the discriminator's classes


class _Reversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky 2015): the identity forward, ``-scale * grad`` back.

    Parameters
    ----------
    x : torch.Tensor
        Any tensor (the features entering the domain discriminator).
    scale : float
        Non-negative factor of the reversed gradient (FedKA ramps it with alpha(p)).

    Returns
    -------
    torch.Tensor
        ``x``'s values; gradients reaching it are multiplied by ``-scale``.

    Raises
    ------
    ValueError
        If ``scale`` is negative or not finite.
    """
    if not (scale >= 0 and scale != float("inf")):
        raise ValueError(f"grad_reverse needs a finite scale >= 0, got {scale}")
    return _Reversal.apply(x, float(scale))


class DomainDiscriminator(nn.Module):
    """The notebook's domain classifier: Linear(D, hidden) - BatchNorm - ReLU - Linear(hidden, 2).

    Parameters
    ----------
    feature_dim : int
        Width D of the features it reads.
    hidden : int
        Width of its hidden layer (100 in the notebook).
    """

    def __init__(self, feature_dim: int, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass(frozen=True)
class DomainLoss:
    """One step's domain-adversarial loss and the discriminator's accuracy on that step."""

    loss: torch.Tensor
    accuracy: float


def domain_adversarial_loss(
    discriminator: nn.Module,
    source_features: torch.Tensor,
    target_embeddings: torch.Tensor,
    reversal: float,
) -> DomainLoss:
    """``CE(D(R(f_s)), source) + CE(D(e_t), target)``, with R the gradient reversal.

    The discriminator D learns to tell the source's features from the target embeddings; the
    reversal hands the encoder ``-reversal`` times the discriminator's gradient, so minimising the
    sum trains D and, at once, makes the source features harder to tell from the target's. The
    embeddings are fixed anchors: no gradient reaches what produced them.

    Parameters
    ----------
    discriminator : nn.Module
        Maps (n, D) features to (n, 2) logits (:class:`DomainDiscriminator`).
    source_features : torch.Tensor
        The source batch's features, (m, D), attached to the encoder's graph.
    target_embeddings : torch.Tensor
        Target embeddings, (n, D); detached here.
    reversal : float
        Scale of the reversed gradient (>= 0).

    Returns
    -------
    DomainLoss
        The summed mean cross-entropies (the notebook's two NLL terms) and the fraction of the
        m + n rows that D classified right.
    """
    reversed_source = grad_reverse(source_features, reversal)
    inputs = torch.cat([reversed_source, target_embeddings.detach()], dim=0)
    logits = discriminator(inputs)
    m = source_features.shape[0]
    domains = torch.cat(
        [
            torch.full((m,), SOURCE, device=logits.device),
            torch.full((target_embeddings.shape[0],), TARGET, device=logits.device),
        ]
    )
    loss = nn.functional.cross_entropy(logits[:m], domains[:m]) + nn.functional.cross_entropy(
        logits[m:], domains[m:]
    )
    accuracy = float((logits.detach().argmax(1) == domains).float().mean())
    return DomainLoss(loss=loss, accuracy=accuracy)


def new_discriminator(feature_dim: int, hidden: int, seed: int) -> DomainDiscriminator:
    """A discriminator initialised from ``seed`` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DomainDiscriminator(feature_dim, hidden)
