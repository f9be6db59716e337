"""Diagonal Fisher information of a classifier, the weights of Fisher-weighted merging.

The Fisher of parameter ``theta`` is ``E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2``
(Matena & Raffel, NeurIPS 2022). It needs *per-example* gradients: squaring a batch gradient
would mix examples. They come from ``torch.func`` (``functional_call`` + ``vmap`` + ``vjp`` /
``grad``), so one vectorised call handles a whole chunk of examples instead of a Python loop.

Memory: a chunk holds a few per-example copies of every parameter (the running sum, the
current gradient, a temporary), so the chunk size is set from a fixed budget (``_CHUNK_BYTES``):
33 examples per chunk for the 166k-parameter digit CNN, 1 for an 11M-parameter resnet18.
Larger chunks were measured to be slower on CPU (the per-example gradients leave the cache).
In ``exact`` mode the forward pass runs once per example and the ``C`` class gradients are
taken one after another from the same ``vjp`` (a loop over classes, not examples), which keeps
memory at that of one gradient per example instead of the ``C``-times larger per-example
Jacobian that ``jacrev`` would build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from fedalign.settings.fisher import MODES

_CHUNK_BYTES = 64 * 2**20
_COPIES_PER_EXAMPLE = 3

_Tensors = dict[str, torch.Tensor]
_Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[_Batch],
    mode: str = "exact",
    n_examples: int = 4096,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Diagonal Fisher of every trainable parameter of a classifier, averaged over examples.

    Parameters
    ----------
    model : nn.Module
        A classifier mapping a batch of inputs to logits ``(N, C)``. It is evaluated in eval
        mode (BatchNorm uses its running statistics, Dropout is off); its modes, weights and
        device are left as they were.
    batches : Iterable of torch.Tensor or (torch.Tensor, torch.Tensor)
        Input batches, or ``(inputs, labels)`` pairs. Labels are only used by ``empirical``.
    mode : str
        ``exact``: ``sum_y p(y|x) g_y^2`` over all classes (the reference's choice);
        ``empirical``: ``g_y^2`` for the true label; ``sampled``: ``g_y^2`` for one
        ``y ~ p(y|x)`` per example. ``g_y`` is the gradient of ``log p(y|x)``.
    n_examples : int
        Use at most this many examples; the rest of ``batches`` is not read.
    device : torch.device or str, optional
        Where to compute; defaults to the device of the model's parameters.
    seed : int
        Seed of the label sampling of ``sampled`` mode.

    Returns
    -------
    dict[str, np.ndarray]
        One float32 array per parameter with ``requires_grad`` (names and shapes as in
        ``model.named_parameters()``). Buffers get none.

    Raises
    ------
    ValueError
        On an unknown mode, ``empirical`` without labels, or no examples.
    """
    if mode not in MODES:
        raise ValueError(f"unknown Fisher mode '{mode}' (known: {', '.join(MODES)})")
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples}")
    device = torch.device(device) if device is not None else _model_device(model)
    params = {n: p.detach().to(device) for n, p in model.named_parameters() if p.requires_grad}
    fixed = _fixed_tensors(model, params, device)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        totals, seen = _accumulate(model, params, fixed, batches, mode, n_examples, seed, device)
    finally:
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("no examples to estimate the Fisher from: the batches are empty")
    return {name: (total / seen).cpu().numpy().astype(np.float32) for name, total in totals.items()}


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _fixed_tensors(model: nn.Module, params: _Tensors, device: torch.device) -> _Tensors:
    """Buffers and frozen parameters: inputs of the forward pass that get no gradient."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t.detach().to(device) for name, t in named if name not in params}


def _accumulate(
    model: nn.Module,
    params: _Tensors,
    fixed: _Tensors,
    batches: Iterable[_Batch],
    mode: str,
    n_examples: int,
    seed: int,
    device: torch.device,
) -> tuple[_Tensors, int]:
    """Sum of the per-example Fisher contributions over the first ``n_examples`` examples."""
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    chunk = _chunk_size(params)
    seen = 0
    for x, y in _examples(batches, n_examples):
        for start in range(0, len(x), chunk):
            xs = x[start : start + chunk].to(device)
            ys = None if y is None else y[start : start + chunk].to(device)
            contribution = _chunk_fisher(model, params, fixed, xs, ys, mode, generator)
            for name, value in contribution.items():
                totals[name] += value.sum(dim=0)
        seen += len(x)
    return totals, seen


def _examples(
    batches: Iterable[_Batch], n_examples: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(inputs, labels or None)`` batches, cut to ``n_examples`` examples in total."""
    left = n_examples
    for batch in batches:
        x, y = _split_batch(batch)
        x, y = x[:left], None if y is None else y[:left]
        yield x, y
        left -= len(x)
        if left == 0:
            return


def _split_batch(batch: _Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if len(x) != len(y):
            raise ValueError(f"a batch has {len(x)} inputs but {len(y)} labels")
        return x, y
    raise ValueError(f"a batch must be a tensor or an (inputs, labels) pair, got {type(batch)}")


def _chunk_size(params: _Tensors) -> int:
    bytes_per_copy = sum(p.numel() * p.element_size() for p in params.values())
    return max(1, _CHUNK_BYTES // (_COPIES_PER_EXAMPLE * max(bytes_per_copy, 1)))


def _chunk_fisher(
    model: nn.Module,
    params: _Tensors,
    fixed: _Tensors,
    xs: torch.Tensor,
    ys: torch.Tensor | None,
    mode: str,
    generator: torch.Generator,
) -> _Tensors:
    """Per-example Fisher contributions ``(N, *shape)`` of one chunk of examples."""

    def log_probs(p: _Tensors, x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, fixed), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1).squeeze(0)

    if mode == "exact":
        return vmap(_exact_contribution(log_probs), in_dims=(None, 0))(params, xs)
    if mode == "sampled":
        ys = _sample_labels(model, params, fixed, xs, generator)
    elif ys is None:
        raise ValueError("Fisher mode 'empirical' needs labels: pass (inputs, labels) batches")
    return vmap(_label_contribution(log_probs), in_dims=(None, 0, 0))(params, xs, ys)


def _exact_contribution(
    log_probs: Callable[[_Tensors, torch.Tensor], torch.Tensor],
) -> Callable[[_Tensors, torch.Tensor], _Tensors]:
    """One example's ``sum_y p(y|x) g_y^2``: one forward pass, one ``vjp`` per class."""

    def contribution(p: _Tensors, x: torch.Tensor) -> _Tensors:
        log_p, pullback = vjp(lambda q: log_probs(q, x), p)
        # The pullback is linear: a cotangent sqrt(p_y) e_y yields sqrt(p_y) g_y, whose
        # square is the class's weighted term.
        root_probs = torch.diag(log_p.detach().mul(0.5).exp())
        total = {name: torch.zeros_like(value) for name, value in p.items()}
        for y in range(log_p.shape[-1]):
            (grads,) = pullback(root_probs[y])
            total = {name: torch.addcmul(total[name], g, g) for name, g in grads.items()}
        return total

    return contribution


def _label_contribution(
    log_probs: Callable[[_Tensors, torch.Tensor], torch.Tensor],
) -> Callable[[_Tensors, torch.Tensor, torch.Tensor], _Tensors]:
    """One example's ``g_y^2`` for a given label ``y``."""

    def log_prob_of(p: _Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return log_probs(p, x).gather(0, y.reshape(1)).squeeze(0)

    def contribution(p: _Tensors, x: torch.Tensor, y: torch.Tensor) -> _Tensors:
        return {name: g.square() for name, g in grad(log_prob_of)(p, x, y).items()}

    return contribution


@torch.no_grad()
def _sample_labels(
    model: nn.Module,
    params: _Tensors,
    fixed: _Tensors,
    xs: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One label per example drawn from the model's predictive distribution."""
    probs = torch.softmax(functional_call(model, (params, fixed), (xs,)), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(xs.device)


def pack_float16(
    fisher: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fisher -> (float16 values in [0, 1], float32 per-array scales) for transport.

    Diagonal Fishers are often far below float16's smallest normal number (6e-5) and would
    round to zero; dividing each array by its maximum keeps 11 bits of relative precision for
    every entry within ~2^24 of that maximum. Undo with :func:`unpack_float16`.
    """
    halves, scales = {}, {}
    for name, values in fisher.items():
        peak = float(values.max()) if values.size else 0.0
        scale = peak if peak > 0 and np.isfinite(peak) else 1.0
        halves[name] = (values / scale).astype(np.float16)
        scales[name] = np.array([scale], dtype=np.float32)
    return halves, scales


def unpack_float16(
    halves: dict[str, np.ndarray], scales: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_float16` (float32 out)."""
    return {name: halves[name].astype(np.float32) * scales[name][0] for name in halves}
