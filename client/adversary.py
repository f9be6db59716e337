"""A source silo's domain discriminator (FedKA's features disentangler) across rounds.

The discriminator and its optimizer are this silo's own: they live in ``Context.state`` (and,
through ``client.state``, in the silo's state file) and never enter a reply. Each round the silo
rebuilds them from there, so the discriminator keeps learning as the encoder moves.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Context

from client import kept_module
from fedalign.settings.fedka import SourceAlignment

log = logging.getLogger("fedalign.client")
KEY = "discriminator"  # Context.state key (client/kept_module.py)


def build(
    context: Context, embeddings: np.ndarray, wanted: SourceAlignment, train_cfg: Any, tag: str
) -> Any:
    """This round's :class:`fedalign.train.Adversary`, or None when the disentangler is off.

    Parameters
    ----------
    context : Context
        The silo's Flower context; its state holds the discriminator of earlier rounds.
    embeddings : np.ndarray
        (M, D) target embeddings received this round.
    wanted : SourceAlignment
        The round's alignment settings: the disentangler's weight, reversal scale, width.
    train_cfg : TrainConfig
        The silo's local-update settings (the discriminator uses the same optimizer and lr).
    tag : str
        Log prefix naming the silo and round.
    """
    from fedalign.disentangle import new_discriminator
    from fedalign.train import Adversary

    weight = wanted.disentangle_weight
    if weight <= 0:
        return None
    hidden = wanted.disentangle_hidden
    meta = {"feature-dim": int(embeddings.shape[1]), "hidden": hidden}
    discriminator, optimizer = kept_module.restore(
        context,
        KEY,
        meta,
        lambda: new_discriminator(meta["feature-dim"], hidden, train_cfg.seed),
        train_cfg,
        tag,
        "domain discriminator",
    )
    return Adversary(
        discriminator=discriminator,
        optimizer=optimizer,
        embeddings=embeddings,
        weight=weight,
        reversal=wanted.reversal_scale,
    )


def save(context: Context, adversary: Any) -> None:
    """Keep the discriminator and its optimizer in ``context.state`` for the next round."""
    first = adversary.discriminator.net[0]
    meta = {"feature-dim": int(first.in_features), "hidden": int(first.out_features)}
    kept_module.keep(context, KEY, adversary.discriminator, adversary.optimizer, meta)
