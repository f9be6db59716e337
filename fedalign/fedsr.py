"""FedSR (Nguyen, Torr & Lim, NeurIPS 2022): a probabilistic representation and its two
regularizers, as in the official code (github.com/atuannguyen/FedSR, ``src/methods``).

The classifier reads a sample z ~ N(mu(x), diag sigma(x)^2) instead of a deterministic
representation. A model of ``fedalign.models`` is wrapped: everything up to its last linear
layer plus one new linear layer (``posterior``) computes mu and a softplus scale, and the last
linear layer classifies z. So z has the width that layer reads (512 for resnet18, the official
``z_dim`` of its resnet18 runs; 100 for the digit CNN) and the classifier is one linear layer,
as in the official code. Each source adds to its cross-entropy

- L2R: ``l2r_weight * E ||z||_2`` (the official code's ``z.norm(dim=1).mean()``);
- CMI: ``cmi_weight * E KL(N(c mu(x), c sigma(x)) || N(r_mu[y], softplus(r_sigma)[y]))``,
  summed over the dimensions of z, with learned class-conditional Gaussians ``r`` and a
  learned scale ``c`` (:class:`ReferenceDistribution`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from fedalign.models import SplitModel

EVAL_SEED = 0  # the noise of an evaluation's samples of z: the same metrics on every run


def split_head(head: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A model's head as (the layers before its last linear layer, that linear layer).

    Parameters
    ----------
    head : nn.Module
        A ``SplitModel``'s head: one ``nn.Linear`` or an ``nn.Sequential`` ending in one.
    """
    if isinstance(head, nn.Linear):
        return nn.Identity(), head
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
        return head[:-1], head[-1]
    raise TypeError(f"FedSR needs a head that ends in nn.Linear, not {type(head).__name__}")


def reparameterize(
    mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A sample ``mu + sigma * eps``, eps ~ N(0, I), differentiable in ``mu`` and ``sigma``.

    Parameters
    ----------
    mu, sigma : torch.Tensor
        Mean and standard deviation, same shape.
    generator : torch.Generator, optional
        Draws eps (else torch's global generator).
    """
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + sigma * eps


class GaussianModel(SplitModel):
    """A ``SplitModel`` whose classifier reads z ~ N(mu(x), diag sigma(x)^2).

    The wrapped model's ``encoder`` and ``head`` keep their parameter names; the new
    ``posterior`` layer maps the input of the head's last linear layer (width D) to 2D values,
    mu and the pre-softplus scale. ``features`` is a sample of z in training mode and mu in
    evaluation mode; ``forward`` in evaluation mode returns the log of the class probabilities
    averaged over ``eval_samples`` samples of z (the official ``num_samples``), drawn with a
    generator seeded by ``EVAL_SEED`` so that an evaluation is reproducible.

    Parameters
    ----------
    base : SplitModel
        The model to make probabilistic (``fedalign.models.build_model``).
    eval_samples : int
        Samples of z averaged at evaluation.
    """

    def __init__(self, base: SplitModel, eval_samples: int) -> None:
        super().__init__()
        if eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1 (got {eval_samples})")
        self.encoder, self.head = base.encoder, base.head
        self.z_dim = split_head(base.head)[1].in_features
        self.posterior = nn.Linear(self.z_dim, 2 * self.z_dim)
        self.eval_samples = eval_samples

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation (softplus of the second half) of z given ``x``."""
        trunk, _ = split_head(self.head)
        params = self.posterior(trunk(self.encoder(x)))
        mu, scale = params.split(self.z_dim, dim=1)
        return mu, functional.softplus(scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.distribution(x)
        return reparameterize(mu, sigma) if self.training else mu

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return split_head(self.head)[1](f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.classify(self.features(x))
        mu, sigma = self.distribution(x)
        generator = torch.Generator(device=mu.device).manual_seed(EVAL_SEED)
        log_probabilities = torch.stack(
            [
                self.classify(reparameterize(mu, sigma, generator)).log_softmax(dim=1)
                for _ in range(self.eval_samples)
            ]
        )
        # log of the mean probability, without underflow
        return log_probabilities.logsumexp(dim=0) - math.log(self.eval_samples)


class ReferenceDistribution(nn.Module):
    """FedSR's r(z|y) = N(r_mu[y], diag softplus(r_sigma[y])^2) and the scale ``c``.

    In the official code these are parameters of each client, outside the model it averages:
    they are trained by and stay in their source silo. Initialised as there: ``r_mu`` 0,
    ``r_sigma`` 1 (before the softplus), ``c`` 1.

    Parameters
    ----------
    num_classes : int
        Classes (rows of ``r_mu`` and ``r_sigma``).
    z_dim : int
        Width of z.
    """

    def __init__(self, num_classes: int, z_dim: int) -> None:
        super().__init__()
        self.r_mu = nn.Parameter(torch.zeros(num_classes, z_dim))
        self.r_sigma = nn.Parameter(torch.ones(num_classes, z_dim))
        self.c = nn.Parameter(torch.ones(1))  # shape (1,): a 0-d array would not survive the wire


def l2r_loss(z: torch.Tensor) -> torch.Tensor:
    """FedSR's L2R term: the mean over the batch of ||z||_2 (not squared, as in the official
    code).

    Parameters
    ----------
    z : torch.Tensor
        (N, D) samples of the representation.
    """
    return z.norm(dim=1).mean()


def gaussian_kl(
    mu: torch.Tensor, sigma: torch.Tensor, ref_mu: torch.Tensor, ref_sigma: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(ref_mu, ref_sigma^2)) per element (univariate Gaussians).

    Parameters
    ----------
    mu, sigma : torch.Tensor
        Mean and standard deviation of the first Gaussian.
    ref_mu, ref_sigma : torch.Tensor
        Mean and standard deviation of the second, broadcastable to ``mu``.
    """
    return (
        ref_sigma.log()
        - sigma.log()
        + (sigma.square() + (mu - ref_mu).square()) / (2 * ref_sigma.square())
        - 0.5
    )


def cmi_loss(
    mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, reference: ReferenceDistribution
) -> torch.Tensor:
    """FedSR's CMI term: the mean over the batch of KL(N(c mu, c sigma) || r(z|y)), summed
    over the dimensions of z.

    Parameters
    ----------
    mu, sigma : torch.Tensor
        (N, D) mean and standard deviation of z given each input.
    labels : torch.Tensor
        (N,) class of each input.
    reference : ReferenceDistribution
        r(z|y) and the scale c.
    """
    ref_sigma = functional.softplus(reference.r_sigma)[labels]
    kl = gaussian_kl(reference.c * mu, reference.c * sigma, reference.r_mu[labels], ref_sigma)
    return kl.sum(dim=1).mean()
