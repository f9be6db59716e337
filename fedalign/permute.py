"""Permutation weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023), numpy in and out.

Permuting a layer's hidden units (and the next layer's inputs alike) leaves a network's function
unchanged, so two models trained from different starts may compute similar features in a
different order. Weight matching finds, for each hidden-unit permutation, the order of one
model's units that best matches a reference model: coordinate descent over the permutations,
each step a linear assignment (``scipy.optimize.linear_sum_assignment``) maximising the sum of
inner products of the weights the permutation acts on, with every other permutation held
fixed, until a sweep changes none (the official code, github samuela/git-re-basin,
``src/weight_matching.py``: ``max_iter=100``, the permutations visited in a random order).

A :data:`PermutationSpec` says which axis of which tensor each permutation acts on; applying
permutations (:func:`apply_permutation`) and matching (:func:`weight_matching`) read only the
spec, so a model is supported by writing its spec (:data:`SPECS`). Tensors are named as in
``fedalign.models.get_weights`` (PyTorch's ``(out, in, ...)`` layout).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

MAX_ITER = 100  # the official weight_matching's default


@dataclass(frozen=True)
class Axis:
    """One axis of one tensor that a hidden-unit permutation reorders.

    Parameters
    ----------
    tensor : str
        The tensor's name.
    axis : int
        Which of its axes.
    block : int (default: 1)
        Entries per unit along the axis: a linear layer after ``Flatten`` sees each conv
        channel as ``block`` consecutive inputs (its spatial positions, channel-major).
    """

    tensor: str
    axis: int
    block: int = 1


PermutationSpec = dict[str, tuple[Axis, ...]]  # permutation name -> the axes it reorders


def digit_cnn_spec(weights: Mapping[str, np.ndarray]) -> PermutationSpec:
    """The permutations of ``fedalign.models.DigitCNN``: its two conv layers' channels and the
    hidden layer of its head.

    Parameters
    ----------
    weights : Mapping of str to np.ndarray
        The model's weights; give the flattened features' block size (spatial positions).
    """
    channels = weights["encoder.4.weight"].shape[0]
    positions = weights["head.0.weight"].shape[1] // channels
    return {
        "conv1": (
            Axis("encoder.0.weight", 0),
            Axis("encoder.0.bias", 0),
            *_batchnorm("encoder.1"),
            Axis("encoder.4.weight", 1),
        ),
        "conv2": (
            Axis("encoder.4.weight", 0),
            Axis("encoder.4.bias", 0),
            *_batchnorm("encoder.5"),
            Axis("head.0.weight", 1, block=positions),
        ),
        "hidden": (
            Axis("head.0.weight", 0),
            Axis("head.0.bias", 0),
            *_batchnorm("head.1"),
            Axis("head.3.weight", 1),
        ),
    }


def mlp_spec(weights: Mapping[str, np.ndarray]) -> PermutationSpec:
    """The permutations of ``fedalign.models.FeatureMLP``: its two hidden layers.

    Parameters
    ----------
    weights : Mapping of str to np.ndarray
        The model's weights (the spec does not depend on their sizes).
    """
    return {
        "hidden1": (
            Axis("encoder.0.weight", 0),
            Axis("encoder.0.bias", 0),
            *_batchnorm("encoder.1"),
            Axis("encoder.4.weight", 1),
        ),
        "hidden2": (
            Axis("encoder.4.weight", 0),
            Axis("encoder.4.bias", 0),
            *_batchnorm("encoder.5"),
            Axis("head.weight", 1),
        ),
    }


def _batchnorm(module: str) -> tuple[Axis, ...]:
    """A BatchNorm layer's affine parameters and running statistics, one entry per unit."""
    return tuple(
        Axis(f"{module}.{name}", 0) for name in ("weight", "bias", "running_mean", "running_var")
    )


SPECS: dict[str, Callable[[Mapping[str, np.ndarray]], PermutationSpec]] = {
    "digit_cnn": digit_cnn_spec,
    "mlp": mlp_spec,
}


def permutation_spec(model: str, weights: Mapping[str, np.ndarray]) -> PermutationSpec:
    """The spec of a registered model (``fedalign.models.MODELS``'s name).

    Parameters
    ----------
    model : str
        The model's name; one of :data:`SPECS`.
    weights : Mapping of str to np.ndarray
        Its weights, for the sizes a spec depends on.

    Raises
    ------
    ValueError
        For a model without a spec, or a spec that does not fit ``weights``.
    """
    if model not in SPECS:
        raise ValueError(f"no permutation spec for model '{model}' (known: {', '.join(SPECS)})")
    spec = SPECS[model](weights)
    for name, axes in spec.items():
        sizes = set()
        for entry in axes:
            if entry.tensor not in weights:
                raise ValueError(f"permutation {name}: no tensor '{entry.tensor}' in the weights")
            length = weights[entry.tensor].shape[entry.axis]
            if length % entry.block:
                raise ValueError(f"permutation {name}: {entry} does not divide into blocks")
            sizes.add(length // entry.block)
        if len(sizes) != 1:
            raise ValueError(f"permutation {name} acts on axes of sizes {sorted(sizes)}")
    return spec


def permute_axis(array: np.ndarray, entry: Axis, perm: np.ndarray) -> np.ndarray:
    """``array`` with its units along ``entry.axis`` reordered: unit i of the result is unit
    ``perm[i]`` of ``array``.

    Parameters
    ----------
    array : np.ndarray
        The tensor ``entry`` names.
    entry : Axis
        The axis (and its block size).
    perm : np.ndarray
        A permutation of ``range(units)``.
    """
    shape = array.shape
    units = shape[entry.axis] // entry.block
    split = (*shape[: entry.axis], units, entry.block, *shape[entry.axis + 1 :])
    return array.reshape(split).take(perm, axis=entry.axis).reshape(shape)


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``weights`` with every permutation applied to every axis it acts on.

    Parameters
    ----------
    spec : PermutationSpec
        Which axes each permutation acts on.
    perms : Mapping of str to np.ndarray
        One permutation per name of ``spec``.
    weights : Mapping of str to np.ndarray
        Named arrays: a model's weights, or anything shaped like (a subset of) them, such as a
        diagonal Fisher (which has no BatchNorm statistics). Tensors no permutation names are
        returned unchanged.
    """
    permuted = dict(weights)
    for name, axes in spec.items():
        for entry in axes:
            if entry.tensor in permuted:
                permuted[entry.tensor] = permute_axis(permuted[entry.tensor], entry, perms[name])
    return permuted


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, np.ndarray],
    other: Mapping[str, np.ndarray],
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Permutations of ``other``'s hidden units that best match ``reference``'s.

    Parameters
    ----------
    spec : PermutationSpec
        Which axes each permutation acts on.
    reference : Mapping of str to np.ndarray
        The model to match. Only the tensors given here enter the objective (pass the
        parameters alone to leave BatchNorm statistics out, as the official code does).
    other : Mapping of str to np.ndarray
        The model to permute, with the same tensors.
    max_iter : int (default: 100)
        Sweeps over all permutations at most.
    seed : int (default: 0)
        The order in which each sweep visits the permutations.

    Returns
    -------
    dict of str to np.ndarray
        One permutation per name of ``spec``; ``apply_permutation(spec, perms, other)`` is
        ``other`` aligned to ``reference``.
    """
    from scipy.optimize import linear_sum_assignment

    used = {
        name: [e for e in axes if e.tensor in reference and e.tensor in other]
        for name, axes in spec.items()
    }
    empty = [name for name, axes in used.items() if not axes]
    if empty:
        raise ValueError(f"permutations {empty} act on no tensor of the given weights")
    sizes = {
        name: reference[axes[0].tensor].shape[axes[0].axis] // axes[0].block
        for name, axes in used.items()
    }
    acting = {}  # tensor -> the (permutation, axis) pairs that reorder it
    for name, axes in used.items():
        for entry in axes:
            acting.setdefault(entry.tensor, []).append((name, entry))
    perms = {name: np.arange(n) for name, n in sizes.items()}
    names = list(used)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for index in rng.permutation(len(names)):
            name, n = names[index], sizes[names[index]]
            cost = np.zeros((n, n))
            for entry in used[name]:
                b = other[entry.tensor]
                for other_name, other_entry in acting[entry.tensor]:
                    if other_entry != entry:
                        b = permute_axis(b, other_entry, perms[other_name])
                a = np.moveaxis(reference[entry.tensor], entry.axis, 0).reshape(n, -1)
                b = np.moveaxis(b, entry.axis, 0).reshape(n, -1)
                cost += a.astype(np.float64) @ b.astype(np.float64).T
            _, best = linear_sum_assignment(cost, maximize=True)
            rows = np.arange(n)
            gain = cost[rows, best].sum() - cost[rows, perms[name]].sum()
            # Relative tolerance: the official 1e-12 is absolute, which float rounding of
            # large sums can exceed without any real gain.
            progress = progress or gain > 1e-12 * max(1.0, abs(cost[rows, best].sum()))
            perms[name] = best
        if not progress:
            break
    return perms
