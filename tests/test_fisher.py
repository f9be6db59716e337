"""Diagonal Fisher: the vectorised modes against brute-force per-example autograd loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedalign.fisher import diagonal_fisher
from fedalign.models import DigitCNN, get_weights

N_CLASSES = 3


@pytest.fixture
def tiny() -> nn.Module:
    """Linear-BN-ReLU-Dropout-Linear with non-trivial BatchNorm running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(8, N_CLASSES),
    )
    with torch.no_grad():
        model(torch.randn(64, 5) * 2 + 1)
    return model


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=generator)
    y = torch.randint(0, N_CLASSES, (12,), generator=generator)
    return x, y


def brute_force_fisher(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """One autograd call per example and class; ``labels=None`` means all classes, p-weighted."""
    model.eval()
    names = [name for name, _ in model.named_parameters()]
    totals = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(x)):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        classes = range(len(log_p)) if labels is None else [int(labels[i])]
        for y in classes:
            weight = log_p[y].exp().item() if labels is None else 1.0
            grads = torch.autograd.grad(log_p[y], list(model.parameters()), retain_graph=True)
            for name, g in zip(names, grads, strict=True):
                totals[name] += weight * g.square()
    return {name: (t / len(x)).numpy() for name, t in totals.items()}


def assert_fishers_close(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float, atol: float = 0.0
) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def test_exact_matches_brute_force(tiny, data):
    x, _ = data
    fisher = diagonal_fisher(tiny, [x[:5], x[5:]], mode="exact")
    assert_fishers_close(fisher, brute_force_fisher(tiny, x, None), rtol=1e-4, atol=1e-10)


def test_exact_ignores_labels(tiny, data):
    x, y = data
    with_labels = diagonal_fisher(tiny, [(x, y)], mode="exact")
    assert_fishers_close(with_labels, diagonal_fisher(tiny, [x], mode="exact"), rtol=0)


def test_empirical_matches_brute_force_with_true_labels(tiny, data):
    x, y = data
    fisher = diagonal_fisher(tiny, [(x[:7], y[:7]), (x[7:], y[7:])], mode="empirical")
    assert_fishers_close(fisher, brute_force_fisher(tiny, x, y), rtol=1e-4, atol=1e-10)


def test_sampled_is_seeded(tiny, data):
    x, _ = data
    first = diagonal_fisher(tiny, [x], mode="sampled", seed=3)
    again = diagonal_fisher(tiny, [x], mode="sampled", seed=3)
    other = diagonal_fisher(tiny, [x], mode="sampled", seed=4)
    assert_fishers_close(first, again, rtol=0)
    assert any(not np.array_equal(first[n], other[n]) for n in first)


def test_sampled_averages_to_exact(tiny, data):
    x, _ = data
    draws = [diagonal_fisher(tiny, [x], mode="sampled", seed=s) for s in range(200)]
    mean = {name: np.mean([d[name] for d in draws], axis=0) for name in draws[0]}
    exact = diagonal_fisher(tiny, [x], mode="exact")
    for name in exact:
        error = np.abs(mean[name] - exact[name]).sum() / np.abs(exact[name]).sum()
        assert error < 0.05, name


def test_sampled_equals_empirical_when_predictions_are_certain(data):
    x, _ = data
    torch.manual_seed(0)
    model = nn.Linear(5, N_CLASSES)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    predicted = torch.ones(len(x), dtype=torch.long)
    sampled = diagonal_fisher(model, [x], mode="sampled", seed=7)
    empirical = diagonal_fisher(model, [(x, predicted)], mode="empirical")
    assert_fishers_close(sampled, empirical, rtol=0)
    assert all((value > 0).any() for value in sampled.values())


def test_n_examples_truncates(tiny, data):
    x, y = data
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    for mode in ("exact", "empirical"):
        truncated = diagonal_fisher(tiny, batches, mode=mode, n_examples=6)
        direct = diagonal_fisher(tiny, [(x[:6], y[:6])], mode=mode)
        assert_fishers_close(truncated, direct, rtol=1e-5, atol=1e-10)


def test_n_examples_stops_reading_batches(tiny, data):
    x, _ = data
    read = []

    def batches():
        for start in range(0, len(x), 4):
            read.append(start)
            yield x[start : start + 4]

    diagonal_fisher(tiny, batches(), n_examples=4)
    assert read == [0]


def test_names_shapes_and_no_buffers(tiny, data):
    fisher = diagonal_fisher(tiny, [data[0]])
    params = dict(tiny.named_parameters())
    assert list(fisher) == list(params)
    for name, value in fisher.items():
        assert value.shape == tuple(params[name].shape)
        assert value.dtype == np.float32
    assert not {name for name, _ in tiny.named_buffers()} & fisher.keys()


def test_model_mode_and_weights_unchanged(tiny, data):
    tiny.train()
    tiny[3].eval()
    before = get_weights(tiny)
    modes = [m.training for m in tiny.modules()]
    diagonal_fisher(tiny, [data[0]], mode="sampled")
    assert [m.training for m in tiny.modules()] == modes
    after = get_weights(tiny)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_digit_cnn_fisher_is_finite_and_non_negative():
    torch.manual_seed(0)
    model = DigitCNN()
    x = torch.randn(8, 3, 28, 28)
    fisher = diagonal_fisher(model, [x], mode="exact")
    assert list(fisher) == [name for name, _ in model.named_parameters()]
    for name, value in fisher.items():
        assert np.isfinite(value).all() and (value >= 0).all(), name
    assert sum(float(v.sum()) for v in fisher.values()) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fancy"}, "unknown Fisher mode"),
        ({"mode": "empirical"}, "needs labels"),
        ({"n_examples": 0}, "n_examples"),
    ],
)
def test_bad_arguments_raise(tiny, data, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        diagonal_fisher(tiny, [data[0]], **kwargs)
    assert "\n" not in str(error.value)


def test_no_examples_raise(tiny):
    with pytest.raises(ValueError, match="no examples"):
        diagonal_fisher(tiny, [])
