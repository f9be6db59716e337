"""A source silo's domain discriminator (FedKA's features disentangler) across rounds.

The discriminator and its optimizer are this silo's own: they live in ``Context.state`` (and,
through ``client.state``, in the silo's state file) and never enter a reply. Each round the silo
rebuilds them from there, so the discriminator keeps learning as the encoder moves.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from fedalign.protocol import from_record, to_record
from fedalign.settings.fedka import SourceAlignment

log = logging.getLogger("fedalign.client")
WEIGHTS = "discriminator"  # Context.state keys
OPTIMIZER = "discriminator-optimizer"
META = "discriminator-meta"


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
    from fedalign.models import set_weights
    from fedalign.train import Adversary, load_optimizer_state, make_optimizer

    weight = wanted.disentangle_weight
    if weight <= 0:
        return None
    hidden = wanted.disentangle_hidden
    meta = {"feature-dim": int(embeddings.shape[1]), "hidden": hidden}
    discriminator = new_discriminator(meta["feature-dim"], hidden, train_cfg.seed)
    optimizer = make_optimizer(discriminator, train_cfg)
    if WEIGHTS in context.state and dict(context.state[META]) == meta:
        try:
            set_weights(discriminator, from_record(context.state[WEIGHTS]))
            load_optimizer_state(optimizer, from_record(context.state[OPTIMIZER]))
        except (KeyError, ValueError) as exc:
            log.warning("%s starting a fresh domain discriminator: %s", tag, exc)
            discriminator = new_discriminator(meta["feature-dim"], hidden, train_cfg.seed)
            optimizer = make_optimizer(discriminator, train_cfg)
    return Adversary(
        discriminator=discriminator,
        optimizer=optimizer,
        embeddings=embeddings,
        weight=weight,
        reversal=wanted.reversal_scale,
    )


def save(context: Context, adversary: Any) -> None:
    """Keep the discriminator and its optimizer in ``context.state`` for the next round."""
    from fedalign.models import get_weights
    from fedalign.train import optimizer_state

    first = adversary.discriminator.net[0]
    context.state[WEIGHTS] = to_record(get_weights(adversary.discriminator))
    context.state[OPTIMIZER] = to_record(optimizer_state(adversary.optimizer))
    context.state[META] = ConfigRecord(
        {"feature-dim": int(first.in_features), "hidden": int(first.out_features)}
    )
