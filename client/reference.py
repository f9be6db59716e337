"""A source silo's FedSR reference distribution r(z|y) across rounds.

As in the official code, r's means and scales (and the scale c) are the silo's own: they live
in ``Context.state`` (and, through ``client.state``, in the silo's state file) with their
optimizer and never enter a reply. Each round the silo rebuilds them from there.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context

from client import kept_module
from fedalign.settings.fedsr import FedSRSettings

log = logging.getLogger("fedalign.client")
KEY = "fedsr-reference"  # Context.state key (client/kept_module.py)


def build(
    context: Context,
    settings: FedSRSettings,
    num_classes: int,
    z_dim: int,
    train_cfg: Any,
    tag: str,
) -> Any:
    """This round's :class:`fedalign.train.RepresentationRegularizers`.

    Parameters
    ----------
    context : Context
        The silo's Flower context; its state holds the reference of earlier rounds.
    settings : FedSRSettings
        The weights of the L2R and CMI terms, as the ``train`` config asked.
    num_classes : int
        Classes of the federation.
    z_dim : int
        Width of the model's z (``GaussianModel.z_dim``).
    train_cfg : TrainConfig
        The silo's local-update settings (the reference uses the same optimizer and lr).
    tag : str
        Log prefix naming the silo and round.
    """
    from fedalign.fedsr import ReferenceDistribution
    from fedalign.train import RepresentationRegularizers

    reference, optimizer = kept_module.restore(
        context,
        KEY,
        {"classes": num_classes, "z-dim": z_dim},
        lambda: ReferenceDistribution(num_classes, z_dim),
        train_cfg,
        tag,
        "reference distribution",
    )
    return RepresentationRegularizers(
        reference=reference,
        optimizer=optimizer,
        l2r_weight=settings.l2r_weight,
        cmi_weight=settings.cmi_weight,
    )


def save(context: Context, regularizers: Any) -> None:
    """Keep the reference and its optimizer in ``context.state`` for the next round."""
    num_classes, z_dim = regularizers.reference.r_mu.shape
    meta = {"classes": int(num_classes), "z-dim": int(z_dim)}
    kept_module.keep(context, KEY, regularizers.reference, regularizers.optimizer, meta)
