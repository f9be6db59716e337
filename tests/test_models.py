"""Models: the feature/classifier split, the registry, weight transport; local training."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedalign.models import MODELS, DigitCNN, build_model, get_weights, set_weights
from fedalign.settings.model import MODEL_NAMES
from fedalign.train import TrainConfig, batch_indices, evaluate, train_local


def test_digit_cnn_matches_the_fedka_architecture():
    model = DigitCNN().eval()
    x = torch.zeros(4, 3, 28, 28)
    features = model.features(x)
    assert features.shape == (4, 800)
    assert model.classify(features).shape == (4, 10)
    assert torch.equal(model(x), model.classify(features))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 64, (5, 5)),
        (64, 50, (5, 5)),
    ]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(800, 100), (100, 10)]


def test_registry_builds_resnet18_with_the_same_split():
    model = build_model("resnet18", num_classes=7).eval()
    features = model.features(torch.zeros(2, 3, 28, 28))
    assert features.shape == (2, 512)
    assert model.classify(features).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


def test_the_config_check_knows_every_registered_model_without_torch():
    assert sorted(MODELS) == sorted(MODEL_NAMES)
    check = "import sys; from fedalign.config import compose, validate; validate(compose([]));"
    check += " assert 'torch' not in sys.modules, 'validating a config imported torch'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_weights_round_trip_and_exclude_integer_buffers():
    torch.manual_seed(0)
    a, b = DigitCNN(), DigitCNN()
    weights = get_weights(a)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert not any("num_batches_tracked" in k for k in weights)
    assert "encoder.1.running_mean" in weights  # BN statistics travel with the model
    set_weights(b, weights)
    x = torch.randn(3, 3, 28, 28)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_mismatched_weights_are_refused_with_the_name():
    weights = get_weights(DigitCNN())
    weights["head.3.weight"] = np.zeros((5, 100), np.float32)
    with pytest.raises(ValueError, match=r"'head\.3\.weight' has shape"):
        set_weights(DigitCNN(), weights)
    del weights["head.3.weight"]
    with pytest.raises(ValueError, match="missing"):
        set_weights(DigitCNN(), weights)


def test_batches_cover_each_epoch_once_and_are_seeded():
    batches = list(batch_indices(10, 4, 5, seed=1))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    assert len(set(np.concatenate(batches[:2]).tolist())) == 8  # no repeats within an epoch
    assert all(
        np.array_equal(x, y) for x, y in zip(batches, batch_indices(10, 4, 5, seed=1), strict=True)
    )


def _toy_data(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is written in their brightness: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = (y[:, None, None, None] * 25 + rng.integers(0, 10, (n, 3, 28, 28))).astype(np.uint8)
    return x, y.astype(np.int64)


def test_local_training_learns_and_is_deterministic():
    x, y = _toy_data()
    cfg = TrainConfig(local_steps=60, batch_size=32, lr=3e-3, seed=5, log_every=0)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = DigitCNN()
    start = get_weights(model)
    before = evaluate(model, x, y, device)["test-accuracy"]
    fit = train_local(model, x, y, cfg, device)
    after = evaluate(model, x, y, device)["test-accuracy"]
    assert after > before + 0.3
    assert fit["train-loss"] > 0 and fit["train-seconds"] > 0
    again = DigitCNN()
    set_weights(again, start)
    train_local(again, x, y, cfg, device)
    assert all(np.array_equal(v, get_weights(again)[k]) for k, v in get_weights(model).items())


def test_training_refuses_a_diverging_loss():
    x, y = _toy_data(64)
    model = DigitCNN()
    with torch.no_grad():
        model.head[3].weight.fill_(float("nan"))
    cfg = TrainConfig(local_steps=3, log_every=0)
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        train_local(model, x, y, cfg, torch.device("cpu"), tag="silo t")


def test_resnet18_without_torchvision_says_how_to_get_it(monkeypatch):
    """Silo images built without torchvision (docker/app.Dockerfile) fail in one line."""
    from fedalign.errors import FedalignError

    for name in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(FedalignError, match=r"needs torchvision.*fedalign\[vision\]"):
        build_model("resnet18", num_classes=7)
    build_model("digit_cnn", num_classes=7)  # the default model needs none
