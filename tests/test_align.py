"""MK-MMD (FedKA notebook's ``MMD_loss``, as DESIGN.md defines it) and the alpha schedule."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from fedalign.align import alpha_schedule, mk_mmd


def _gaussian(rows: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator, dtype=torch.float64) + shift


def _loop_mk_mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float, kernel_num: int) -> float:
    """The DESIGN.md formula, one scalar at a time."""
    points = x.tolist() + y.tolist()
    m, total = len(x), len(points)
    dist = [[sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) for q in points] for p in points]
    base = sum(sum(row) for row in dist) / (total * total - total)
    widths = [base * kernel_mul**k / kernel_mul ** (kernel_num // 2) for k in range(kernel_num)]
    kern = [[sum(math.exp(-d / w) for w in widths) for d in row] for row in dist]

    def block_mean(rows: range, cols: range) -> float:
        return sum(kern[i][j] for i in rows for j in cols) / (len(rows) * len(cols))

    xs, ys = range(m), range(m, total)
    return block_mean(xs, xs) + block_mean(ys, ys) - block_mean(xs, ys) - block_mean(ys, xs)


def _torch_mk_mmd(x: torch.Tensor, y: torch.Tensor, detach_bandwidth: bool) -> torch.Tensor:
    """Reference in torch (kernel_mul 2, kernel_num 5), with or without a detached bandwidth."""
    z = torch.cat([x, y])
    dist = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    total = len(z)
    base = dist.sum() / (total * total - total)
    if detach_bandwidth:
        base = base.detach()
    kern = sum(torch.exp(-dist / (base * 2**k / 4)) for k in range(5))
    m = len(x)
    return kern[:m, :m].mean() + kern[m:, m:].mean() - kern[:m, m:].mean() - kern[m:, :m].mean()


def test_identical_samples_give_zero():
    x = _gaussian(16, 8, seed=0)
    same = mk_mmd(x, x.clone()).item()
    shifted = mk_mmd(x, x + 1.0).item()
    assert shifted > 0.1
    assert abs(same) < 1e-6 * shifted


def test_mmd_grows_with_the_mean_shift():
    x = _gaussian(64, 4, seed=1)
    shifts = (0.0, 0.5, 1.0, 2.0, 4.0)
    values = [mk_mmd(x, _gaussian(64, 4, seed=2, shift=s)).item() for s in shifts]
    assert all(b > a for a, b in pairwise(values))
    assert values[0] < 0.2 * values[2]


@pytest.mark.parametrize(("m", "n"), [(5, 5), (4, 7), (1, 3)])
@pytest.mark.parametrize(("kernel_mul", "kernel_num"), [(2.0, 5), (1.5, 4), (3.0, 1)])
def test_matches_an_explicit_double_loop(m, n, kernel_mul, kernel_num):
    x, y = _gaussian(m, 3, seed=m), _gaussian(n, 3, seed=100 + n, shift=0.7)
    expected = _loop_mk_mmd(x, y, kernel_mul, kernel_num)
    actual = mk_mmd(x, y, kernel_mul=kernel_mul, kernel_num=kernel_num).item()
    assert actual == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_float32_matches_the_double_loop():
    x, y = _gaussian(6, 5, seed=3).float(), _gaussian(6, 5, seed=4, shift=0.3).float()
    assert mk_mmd(x, y).item() == pytest.approx(_loop_mk_mmd(x, y, 2.0, 5), abs=1e-5)


def _grad_of(fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    fn(leaf, y).backward()
    return leaf.grad


def test_gradients_flow_with_a_constant_bandwidth():
    x, y = _gaussian(8, 4, seed=5), _gaussian(8, 4, seed=6, shift=0.5)
    grad = _grad_of(mk_mmd, x, y)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    detached = _grad_of(lambda a, b: _torch_mk_mmd(a, b, detach_bandwidth=True), x, y)
    attached = _grad_of(lambda a, b: _torch_mk_mmd(a, b, detach_bandwidth=False), x, y)
    torch.testing.assert_close(grad, detached, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grad, attached, rtol=1e-6, atol=1e-9)


def test_gradients_reach_y_when_it_requires_grad():
    x = _gaussian(6, 3, seed=7).requires_grad_(True)
    y = _gaussian(4, 3, seed=8, shift=1.0).requires_grad_(True)
    mk_mmd(x, y).backward()
    assert torch.isfinite(y.grad).all()
    assert y.grad.abs().sum() > 0


def test_symmetric_for_equal_batch_sizes():
    x, y = _gaussian(10, 6, seed=9), _gaussian(10, 6, seed=10, shift=0.4)
    assert mk_mmd(x, y).item() == pytest.approx(mk_mmd(y, x).item(), abs=1e-12)


def test_all_points_identical_give_an_attached_zero():
    x = torch.ones(3, 4, requires_grad=True)
    loss = mk_mmd(x, torch.ones(2, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(3, 4))


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(4), torch.zeros(4, 2), "2-D feature batches"),
        (torch.zeros(2, 3, 1), torch.zeros(2, 3), "2-D feature batches"),
        (torch.zeros(4, 3), torch.zeros(4, 2), "feature dimensions differ: 3 vs 2"),
        (torch.zeros(0, 3), torch.zeros(4, 3), "at least one row"),
        (torch.zeros(2, 3), torch.zeros(0, 3), "at least one row"),
    ],
)
def test_bad_inputs_raise(x, y, message):
    with pytest.raises(ValueError, match=message) as info:
        mk_mmd(x, y)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kernel_mul", "kernel_num"), [(0.0, 5), (-2.0, 5), (2.0, 0)])
def test_bad_kernel_settings_raise(kernel_mul, kernel_num):
    with pytest.raises(ValueError, match="kernel_mul > 0 and kernel_num >= 1"):
        mk_mmd(torch.zeros(2, 3), torch.ones(2, 3), kernel_mul=kernel_mul, kernel_num=kernel_num)


def test_alpha_schedule_values():
    assert alpha_schedule(0.0) == 0.0
    assert alpha_schedule(0.5) == pytest.approx(0.8482836399575129, abs=1e-12)
    assert alpha_schedule(1.0) == pytest.approx(0.9866142981514303, abs=1e-12)


def test_alpha_schedule_is_monotonic():
    values = [alpha_schedule(i / 100) for i in range(101)]
    assert all(b > a for a, b in pairwise(values))


def test_alpha_schedule_clips_progress():
    assert alpha_schedule(-3.0) == 0.0
    assert alpha_schedule(7.5) == alpha_schedule(1.0)
    with pytest.raises(ValueError, match="NaN"):
        alpha_schedule(float("nan"))
