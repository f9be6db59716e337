"""Fisher-weighted merging of silo models (Matena & Raffel, NeurIPS 2022), numpy in and out.

``theta*_j = sum_i lambda_i F~_ij theta_ij / sum_i lambda_i F~_ij`` with ``F~ = max(F, floor)``.
BatchNorm running statistics are not parameters and have no Fisher: they are averaged by
example count (:func:`average_buffers`); :func:`split_fisher_weights` separates the two.

The merge streams over each array in blocks that fit the CPU cache, so the temporaries
(numerator, denominator, one scratch block) never grow to the full model size and each
parameter and Fisher value is read from memory once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedalign.settings.fisher import MIN_FLOOR, FisherSettings

_BLOCK = 1 << 15


def fisher_merge(
    params: list[list[np.ndarray]],
    fishers: list[list[np.ndarray]],
    weights: list[float] | None = None,
    floor: float = FisherSettings.floor,
    normalize: bool = False,
) -> list[np.ndarray]:
    """Merge K silos' parameters, each entry weighted by the silos' diagonal Fisher.

    Parameters
    ----------
    params : list of list of np.ndarray
        ``params[i][j]``: silo ``i``'s ``j``-th parameter array (floating point).
    fishers : list of list of np.ndarray
        ``fishers[i][j]``: the non-negative diagonal Fisher of ``params[i][j]`` (same shape;
        any floating dtype, e.g. float16 as transported).
    weights : list of float, optional
        Positive silo weights ``lambda_i`` (e.g. example counts), normalised to sum 1.
        Uniform when omitted.
    floor : float (default: ``FisherSettings.floor``)
        Lower bound applied to every Fisher entry, so entries no silo is informed about get
        the ``lambda``-weighted average. At least ``MIN_FLOOR`` (1e-30).
    normalize : bool
        Divide each ``lambda_i`` by the global L2 norm of silo ``i``'s Fisher (over all its
        arrays) before renormalising, as the reference implementation does by default.

    Returns
    -------
    list of np.ndarray
        The merged arrays, with the shapes and dtypes of silo 0's parameters.

    Raises
    ------
    ValueError
        One line naming the silo and array position of the first invalid input: mismatched
        counts or shapes, non-finite values, negative Fisher, non-positive weights.
    """
    k = len(params)
    _check_structure(params)
    _check_fishers(params, fishers)
    if not floor >= MIN_FLOOR:
        raise ValueError(f"floor must be >= {MIN_FLOOR:g}, got {floor}")
    lambdas = _normalized_weights(weights, k)
    if normalize:
        lambdas = _normalized_weights(lambdas / _fisher_norms(fishers), k)
    return [
        _merge_position([p[j] for p in params], [f[j] for f in fishers], lambdas, floor, j)
        for j in range(len(params[0]))
    ]


def average_buffers(buffers: list[list[np.ndarray]], counts: list[float]) -> list[np.ndarray]:
    """Example-count weighted average of K silos' buffers (BatchNorm running statistics).

    Parameters
    ----------
    buffers : list of list of np.ndarray
        ``buffers[i][j]``: silo ``i``'s ``j``-th buffer.
    counts : list of float
        Positive per-silo weights, typically training example counts.

    Returns
    -------
    list of np.ndarray
        The weighted averages, with the shapes and dtypes of silo 0's buffers.

    Raises
    ------
    ValueError
        One line naming the silo and position of a mismatch or non-finite value.
    """
    _check_structure(buffers)
    lambdas = _normalized_weights(counts, len(buffers))
    merged = []
    for j, first in enumerate(buffers[0]):
        total = np.zeros(first.shape, dtype=np.promote_types(first.dtype, np.float32))
        with np.errstate(invalid="ignore", over="ignore"):
            for lam, silo in zip(lambdas.tolist(), buffers, strict=True):
                total += lam * silo[j]
        if not np.isfinite(total).all():
            _raise_non_finite([silo[j] for silo in buffers], None, j)
        merged.append(total.astype(first.dtype, copy=False))
    return merged


def split_fisher_weights(
    weights: dict[str, np.ndarray], parameter_names: set[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a ``get_weights()`` dict into (parameters, buffers), keeping its order.

    Parameters
    ----------
    weights : dict of str to np.ndarray
        Named arrays, e.g. from :func:`fedalign.models.get_weights`.
    parameter_names : set of str
        Names of the model's parameters (``dict(model.named_parameters())``'s keys).

    Returns
    -------
    tuple of dict
        The parameters (to Fisher-merge) and everything else (to average by count).

    Raises
    ------
    ValueError
        When a parameter name is missing from ``weights``.
    """
    missing = sorted(parameter_names - weights.keys())
    if missing:
        raise ValueError(f"parameters missing from the weights: {missing[:3]}")
    parameters = {name: a for name, a in weights.items() if name in parameter_names}
    buffers = {name: a for name, a in weights.items() if name not in parameter_names}
    return parameters, buffers


def _check_structure(arrays: Sequence[Sequence[np.ndarray]]) -> None:
    """At least one silo; the same number of arrays, shapes and float dtypes in every silo."""
    if len(arrays) < 1:
        raise ValueError("nothing to merge: no silos given")
    reference = arrays[0]
    for i, silo in enumerate(arrays):
        if len(silo) != len(reference):
            raise ValueError(f"silo {i}: {len(silo)} arrays, silo 0 has {len(reference)}")
        for j, (a, ref) in enumerate(zip(silo, reference, strict=True)):
            if a.shape != ref.shape or a.dtype != ref.dtype or a.dtype.kind != "f":
                raise ValueError(
                    f"silo {i}, array {j}: {a.dtype}{list(a.shape)} does not match silo 0's "
                    f"{ref.dtype}{list(ref.shape)} (floating point required)"
                )


def _check_fishers(
    params: Sequence[Sequence[np.ndarray]], fishers: Sequence[Sequence[np.ndarray]]
) -> None:
    """One floating-point Fisher array per parameter array, of the same shape."""
    if len(fishers) != len(params):
        raise ValueError(f"got {len(params)} silos of parameters but {len(fishers)} of Fisher")
    for i, (silo, fisher) in enumerate(zip(params, fishers, strict=True)):
        if len(fisher) != len(silo):
            raise ValueError(f"silo {i}: {len(fisher)} Fisher arrays for {len(silo)} parameters")
        for j, (f, p) in enumerate(zip(fisher, silo, strict=True)):
            if f.shape != p.shape or f.dtype.kind != "f":
                raise ValueError(
                    f"silo {i}, array {j}: Fisher {f.dtype}{list(f.shape)} does not match the "
                    f"parameter's shape {list(p.shape)} (floating point required)"
                )


def _normalized_weights(weights: Sequence[float] | np.ndarray | None, k: int) -> np.ndarray:
    """Silo weights as float64 summing to 1 (uniform when ``None``)."""
    if weights is None:
        return np.full(k, 1.0 / k)
    lambdas = np.asarray(weights, dtype=np.float64)
    if lambdas.shape != (k,):
        raise ValueError(f"got {lambdas.size} silo weights for {k} silos")
    bad = np.flatnonzero(~(np.isfinite(lambdas) & (lambdas > 0)))
    if bad.size:
        raise ValueError(f"silo {bad[0]}: weight {lambdas[bad[0]]} is not positive and finite")
    return lambdas / lambdas.sum()


def _fisher_norms(fishers: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Global L2 norm of each silo's Fisher over all its arrays (of the raw, unfloored Fisher)."""
    norms = []
    for i, silo in enumerate(fishers):
        squares = [_squared_norm(f) for f in silo]
        for j, square in enumerate(squares):
            if not np.isfinite(square):
                raise ValueError(
                    f"silo {i}, array {j}: Fisher norm is not finite (NaN, inf or overflow)"
                )
        if not sum(squares) > 0:
            raise ValueError(f"silo {i}: Fisher is all zero; cannot normalize by its norm")
        norms.append(np.sqrt(sum(squares)))
    return np.array(norms)


def _squared_norm(a: np.ndarray) -> float:
    flat = a.reshape(-1)
    if flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)
    return float(np.dot(flat, flat))


def _merge_position(
    params: list[np.ndarray], fishers: list[np.ndarray], lambdas: np.ndarray, floor: float, j: int
) -> np.ndarray:
    """Merge array position ``j`` of every silo; non-finite inputs are reported afterwards."""
    first = params[0]
    merged = np.empty(first.size, dtype=first.dtype)
    flat_params = [p.reshape(-1) for p in params]
    flat_fishers = [f.reshape(-1) for f in fishers]
    with np.errstate(invalid="ignore", over="ignore"):
        _merge_into(merged, flat_params, flat_fishers, lambdas.tolist(), floor, j)
    if not np.isfinite(merged).all():
        _raise_non_finite(params, fishers, j)
    return merged.reshape(first.shape)


def _merge_into(
    merged: np.ndarray,
    params: list[np.ndarray],
    fishers: list[np.ndarray],
    lambdas: list[float],
    floor: float,
    j: int,
) -> None:
    """Fill the flat ``merged`` block by block, so the temporaries stay cache-sized."""
    # Rows: numerator, denominator, scratch, floor. numpy's maximum against a scalar is not
    # vectorised, against an array it is (~5x faster), hence the row of floors.
    rows = np.empty((4, min(_BLOCK, merged.size)), dtype=np.promote_types(merged.dtype, np.float32))
    rows[3] = floor
    for start in range(0, merged.size, _BLOCK):
        stop = min(start + _BLOCK, merged.size)
        num, den, scratch, floors = rows[:, : stop - start]
        num.fill(0)
        den.fill(0)
        for i, (lam, p, f) in enumerate(zip(lambdas, params, fishers, strict=True)):
            block = f[start:stop]
            if not block.min() >= 0:
                _raise_bad_fisher(i, j, block)
            np.maximum(block, floors, out=scratch)
            scratch *= lam
            den += scratch
            scratch *= p[start:stop]
            num += scratch
        np.divide(num, den, out=merged[start:stop], casting="unsafe")


def _raise_bad_fisher(i: int, j: int, block: np.ndarray) -> None:
    kind = "NaN" if np.isnan(block).any() else "negative"
    raise ValueError(f"silo {i}, array {j}: Fisher has {kind} entries (must be >= 0 and finite)")


def _raise_non_finite(arrays: list[np.ndarray], fishers: list[np.ndarray] | None, j: int) -> None:
    """Name the first silo whose array (or Fisher) at position ``j`` is not finite."""
    for i, a in enumerate(arrays):
        if not np.isfinite(a).all():
            raise ValueError(f"silo {i}, array {j}: non-finite values (NaN or inf)")
        if fishers is not None and not np.isfinite(fishers[i]).all():
            raise ValueError(f"silo {i}, array {j}: Fisher has non-finite values (NaN or inf)")
    raise ValueError(f"array {j}: the merge overflowed to non-finite values")
