"""Generalization adjustment of the aggregation weights (FedDG-GA: Zhang et al., CVPR 2023),
Flower-free.

Every source silo ``i`` has an aggregation weight ``a_i``, uniform (``1/K`` for K sources) at the
start. Once round ``r``'s aggregate exists, each source measures its generalization gap ``G_i``
on its own held-out split: how much worse the aggregate does there than the silo's own local
model of round ``r`` (the one averaged into it). The weights move towards the silos the aggregate
generalizes worst to::

    a_i <- a_i + (d_r / K) * (G_i - mean(G)) / max_j |G_j - mean(G)|

then every weight is clipped to [0, 1] and all are renormalised to sum 1. The step size decays
linearly over the R rounds, ``d_r = d * (1 - (r - 1) / R)``.

The official code (MediaBrain-SJTU/FedDG-GA, ``utils/weight_adjust.py`` and
``algorithms/*/train_pacs_GA.py``) scales the step by ``1/3`` (its K: three PACS sources) and
decays it as ``step_size - (i - 1) * step_size / comm``; read with 1-based rounds ``i``, that is
the schedule above (its loop counts from 0, so its first step is ``d (1 + 1/R)``). It divides
the raw gaps by their largest absolute value without centring them; here they are centred on
their mean as the method is described (issue 17), so the update keeps the weights' sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SCHEDULES = ("linear", "constant")
GAP_METRICS = ("loss", "accuracy")


def step_size(initial: float, rnd: int, rounds: int, schedule: str = "linear") -> float:
    """The step size ``d_r`` of the adjustment made from round ``rnd``'s gaps.

    Parameters
    ----------
    initial : float
        ``d``, the step size of round 1.
    rnd : int
        The round whose aggregate the gaps measure, 1 ... ``rounds``.
    rounds : int
        ``R``, the run's rounds.
    schedule : {"linear", "constant"} (default: "linear")
        ``linear``: ``d * (1 - (rnd - 1) / R)``, from ``d`` down to ``d / R``; ``constant``: ``d``.
    """
    if not 1 <= rnd <= rounds:
        raise ValueError(f"round {rnd} is outside 1..{rounds}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    return initial if schedule == "constant" else initial * (1 - (rnd - 1) / rounds)


def generalization_gap(aggregate: float, local: float, metric: str = "loss") -> float:
    """How much worse the aggregate does on a silo's held-out split than its local model.

    Parameters
    ----------
    aggregate : float
        The aggregate's loss (or accuracy) on the silo's held-out split.
    local : float
        The silo's local model's loss (or accuracy) on the same split.
    metric : {"loss", "accuracy"} (default: "loss")
        ``loss``: ``aggregate - local``; ``accuracy``: ``local - aggregate``.
    """
    if metric not in GAP_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(GAP_METRICS)}")
    return aggregate - local if metric == "loss" else local - aggregate


def adjust_weights(
    weights: Mapping[str, float], gaps: Mapping[str, float], step: float
) -> dict[str, float]:
    """One generalization adjustment of the aggregation weights.

    Parameters
    ----------
    weights : Mapping of str to float
        Every source's current weight (non-negative, summing to 1).
    gaps : Mapping of str to float
        The generalization gaps of the sources that measured one this round; a source without
        one (it missed the round) keeps its weight until the renormalisation.
    step : float
        ``d_r`` (:func:`step_size`); it is divided by the number of sources, K.

    Returns
    -------
    dict of str to float
        The new weights, in ``weights``' order, clipped to [0, 1] and summing to 1. Equal gaps
        (or fewer than two) leave the weights unchanged.
    """
    unknown = sorted(set(gaps) - set(weights))
    if unknown:
        raise ValueError(f"gaps of sources without a weight: {', '.join(unknown)}")
    names = list(weights)
    adjusted = np.array([weights[n] for n in names], dtype=np.float64)
    measured = [n for n in names if n in gaps]
    values = np.array([gaps[n] for n in measured], dtype=np.float64)
    if values.size and np.ptp(values) > 0:  # exactly equal gaps: no deviation, no move
        deviation = values - values.mean()
        moved = [names.index(n) for n in measured]
        adjusted[moved] += step / len(names) * deviation / np.abs(deviation).max()
    adjusted = np.clip(adjusted, 0.0, 1.0)
    return dict(zip(names, (adjusted / adjusted.sum()).tolist(), strict=True))


def weights_of(weights: Mapping[str, float], silos: Sequence[str]) -> list[float]:
    """The weights of the silos that replied, renormalised over them (uniform if all are 0).

    Parameters
    ----------
    weights : Mapping of str to float
        Every source's weight (:func:`adjust_weights`).
    silos : Sequence of str
        The silos whose models are averaged this round.
    """
    chosen = np.array([weights[s] for s in silos], dtype=np.float64)
    total = chosen.sum()
    if total <= 0:
        return [1.0 / len(silos)] * len(silos)
    return (chosen / total).tolist()
