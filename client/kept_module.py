"""A torch module a source silo keeps across rounds, with its optimizer, in ``Context.state``.

FedKA's domain discriminator (``client/adversary.py``) and FedSR's reference distribution
(``client/reference.py``) are such modules: the silo's own, never in a reply. Under a state key
``key`` the weights live at ``key``, the optimizer's state at ``key-optimizer`` and the shapes
they were made for at ``key-meta`` (through ``client.state`` also in the silo's state file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context

from fedalign.protocol import from_record, to_record

log = logging.getLogger("fedalign.client")


def restore(
    context: Context,
    key: str,
    meta: dict[str, int],
    fresh: Callable[[], Any],
    train_cfg: Any,
    tag: str,
    what: str,
) -> tuple[Any, Any]:
    """The module and its optimizer of earlier rounds, or fresh ones.

    Parameters
    ----------
    context : Context
        The silo's Flower context.
    key : str
        The module's state key.
    meta : dict of str to int
        The shapes this round needs; a kept module made for others is not used.
    fresh : callable
        Builds a new module.
    train_cfg : TrainConfig
        The silo's local-update settings (the module's optimizer is of the same kind and lr).
    tag : str
        Log prefix naming the silo and round.
    what : str
        The module, in the log line when a kept one cannot be used.
    """
    from fedalign.models import set_weights
    from fedalign.train import load_optimizer_state, make_optimizer

    module = fresh()
    optimizer = make_optimizer(module, train_cfg)
    if key in context.state and dict(context.state[f"{key}-meta"]) == meta:
        try:
            set_weights(module, from_record(context.state[key]))
            load_optimizer_state(optimizer, from_record(context.state[f"{key}-optimizer"]))
        except (KeyError, ValueError) as exc:
            log.warning("%s starting a fresh %s: %s", tag, what, exc)
            module = fresh()
            optimizer = make_optimizer(module, train_cfg)
    return module, optimizer


def keep(context: Context, key: str, module: Any, optimizer: Any, meta: dict[str, int]) -> None:
    """Keep ``module`` and its optimizer under ``key`` for the next round.

    Parameters
    ----------
    context : Context
        The silo's Flower context.
    key : str
        The module's state key.
    module, optimizer : torch.nn.Module, torch.optim.Optimizer
        What to keep.
    meta : dict of str to int
        The shapes ``module`` was made for.
    """
    from fedalign.models import get_weights
    from fedalign.train import optimizer_state

    context.state[key] = to_record(get_weights(module))
    context.state[f"{key}-optimizer"] = to_record(optimizer_state(optimizer))
    context.state[f"{key}-meta"] = ConfigRecord(meta)
