"""FedKA's features disentangler and class-aware alignment, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedalign.classalign import (
    VARIANCE_FLOOR,
    ClassStatistics,
    class_alignment_loss,
    class_statistics,
)
from fedalign.disentangle import domain_adversarial_loss, grad_reverse, new_discriminator
from fedalign.models import DigitCNN
from fedalign.train import Adversary, ClassAlignment, TrainConfig, train_local


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(4, 3)
    out = grad_reverse(x, 0.37)
    assert torch.equal(out, x)
    (out * weights).sum().backward()
    assert torch.allclose(x.grad, -0.37 * weights)


def test_gradient_reversal_refuses_a_negative_scale() -> None:
    with pytest.raises(ValueError, match="scale >= 0"):
        grad_reverse(torch.zeros(1), -1.0)


def test_domain_loss_trains_the_discriminator_and_reverses_into_the_encoder() -> None:
    torch.manual_seed(0)
    disc = new_discriminator(5, 7, seed=3)
    source = torch.randn(6, 5, requires_grad=True)
    target = torch.randn(4, 5)
    result = domain_adversarial_loss(disc, source, target, reversal=0.5)
    result.loss.backward()
    reversed_grad = source.grad.clone()
    # Direct: the same loss without the reversal gives the plain gradient; reversal = -0.5 x it.
    source.grad = None
    disc.zero_grad()
    logits = disc(torch.cat([source, target]))
    labels = torch.tensor([0] * 6 + [1] * 4)
    plain = torch.nn.functional.cross_entropy(
        logits[:6], labels[:6]
    ) + torch.nn.functional.cross_entropy(logits[6:], labels[6:])
    assert torch.allclose(result.loss, plain)
    plain.backward()
    assert torch.allclose(reversed_grad, -0.5 * source.grad, atol=1e-7)
    assert 0.0 <= result.accuracy <= 1.0


def test_new_discriminator_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(1)
    torch.manual_seed(11)
    a = new_discriminator(8, 4, seed=5)
    assert torch.equal(torch.rand(1), expected)
    b = new_discriminator(8, 4, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def _direct_statistics(x, y, num_classes, min_count):
    x = x.astype(np.float64)
    present = [c for c in range(num_classes) if (y == c).sum() >= min_count]
    means = {c: x[y == c].mean(axis=0) for c in present}
    residuals = np.concatenate([x[y == c] - means[c] for c in present])
    variance = (residuals**2).sum(axis=0) / (len(residuals) - len(present))
    return present, means, variance


def test_class_statistics_match_a_direct_float64_computation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32) * 3 + 1
    y = rng.choice(4, size=60, p=[0.5, 0.3, 0.17, 0.03])
    stats = class_statistics(x, y, num_classes=4, min_count=5)
    present, means, variance = _direct_statistics(x, y, 4, 5)
    assert list(np.flatnonzero(stats.present)) == present
    for c in range(4):
        want = means.get(c, np.zeros(5))
        np.testing.assert_allclose(stats.means[c], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.variance, variance, rtol=1e-6)


def test_class_statistics_need_two_classes() -> None:
    x = np.ones((10, 3), np.float32)
    assert class_statistics(x, np.zeros(10, dtype=np.int64), 3, min_count=2) is None


def test_class_alignment_loss_matches_a_direct_float64_computation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=80)
    stats = class_statistics(x, y, num_classes=4, min_count=2)  # class 3 is absent
    feats = rng.normal(size=(9, 6))
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
    loss = class_alignment_loss(
        torch.tensor(feats, dtype=torch.float64), torch.tensor(labels), stats
    )
    v = stats.variance.astype(np.float64)
    precision = 1.0 / (v + VARIANCE_FLOOR * v.mean())
    present = np.flatnonzero(stats.present)
    terms = []
    for f, label in zip(feats, labels, strict=True):
        if label not in present:
            continue
        d = {
            c: float(((f - stats.means[c].astype(np.float64)) ** 2 * precision).sum())
            for c in present
        }
        terms.append(np.log(d[label] / sum(d.values())))
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-10)


def test_class_alignment_pulls_features_toward_their_class_mean() -> None:
    means = np.array([[2.0, 0.0], [-2.0, 0.0]], np.float32)
    stats = ClassStatistics(means, np.ones(2, np.float32), np.array([True, True]))
    f = torch.tensor([[0.5, 0.3]], requires_grad=True)
    class_alignment_loss(f, torch.tensor([0]), stats).backward()
    assert f.grad[0, 0] < 0  # descending the loss moves x toward class 0's mean at +2


def test_class_statistics_round_trip_and_refuse_a_bad_record() -> None:
    stats = ClassStatistics(
        np.ones((3, 2), np.float32), np.ones(2, np.float32), np.array([True, False, True])
    )
    back = ClassStatistics.from_arrays(stats.to_arrays())
    assert np.array_equal(back.present, stats.present)
    bad = stats.to_arrays() | {"variance": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="do not fit together"):
        ClassStatistics.from_arrays(bad)
    with pytest.raises(ValueError, match="non-finite"):
        ClassStatistics.from_arrays(stats.to_arrays() | {"means": np.full((3, 2), np.nan)})


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_train_local_runs_both_terms_and_reports_them() -> None:
    x, y = _digits(64, 0)
    torch.manual_seed(0)
    model = DigitCNN()
    disc = new_discriminator(DigitCNN.feature_dim, 16, seed=1)
    before = [p.detach().clone() for p in disc.parameters()]
    embeddings = np.random.default_rng(2).random((40, DigitCNN.feature_dim), dtype=np.float32)
    feats = np.random.default_rng(3).random((100, DigitCNN.feature_dim), dtype=np.float32)
    stats = class_statistics(feats, np.arange(100) % 10, 10, min_count=2)
    cfg = TrainConfig(local_steps=3, batch_size=16, log_every=0)
    metrics = train_local(
        model,
        x,
        y,
        cfg,
        torch.device("cpu"),
        adversary=Adversary(disc, torch.optim.Adam(disc.parameters()), embeddings, 0.5, 0.8),
        class_align=ClassAlignment(stats, 0.2),
    )
    assert {"domain-loss", "domain-accuracy", "class-align-loss"} <= metrics.keys()
    assert "mmd" not in metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))
