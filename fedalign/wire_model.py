"""The model a message's config describes (Flower-free): the server builds its initial model
from the same keys it sends, so the server and every silo build the same one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedalign.fedsr import GaussianModel
from fedalign.models import SplitModel, build_model
from fedalign.settings.fedsr import EVAL_SAMPLES


def model_from_config(config: Mapping[str, Any]) -> SplitModel:
    """The model a message's config describes; the server builds its initial model from the
    same keys it sends, so both sides build the same one.

    Parameters
    ----------
    config : Mapping
        ``model``, ``num-classes`` (default 10), ``in-channels`` (default 3) and, with FedSR,
        ``fedsr-eval-samples``: then FedSR's probabilistic variant (``fedalign.fedsr``).
    """
    model = build_model(
        str(config["model"]), int(config.get("num-classes", 10)), int(config.get("in-channels", 3))
    )
    if EVAL_SAMPLES not in config:
        return model
    return GaussianModel(model, int(config[EVAL_SAMPLES]))
