"""FedSR: the probabilistic model, its two regularizers against direct computations, the
source's round on the in-process grid, and the settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from fedalign.config import ConfigError, compose, validate
from fedalign.fedsr import (
    GaussianModel,
    ReferenceDistribution,
    cmi_loss,
    l2r_loss,
    reparameterize,
)
from fedalign.models import DigitCNN, build_model, get_weights
from fedalign.protocol import ARRAYS, CONFIG, METRICS, from_record, to_record
from fedalign.settings.catalog import strategy_settings
from fedalign.settings.fedsr import EVAL_SAMPLES, FedSRSettings
from fedalign.train import RepresentationRegularizers, TrainConfig, batch_indices, train_local
from fedalign.wire_model import model_from_config
from strategies.fedavg import SiloFedAvg
from strategies.registry import STRATEGIES
from tests.conftest import make_context, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")


def softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x))


# The regularizers against direct computations ------------------------------------------------
def test_l2r_is_the_mean_norm_of_z():
    z = np.random.default_rng(0).normal(size=(7, 5))
    expected = np.mean([np.sqrt(sum(v * v for v in row)) for row in z])
    assert l2r_loss(torch.from_numpy(z)).item() == pytest.approx(expected, rel=1e-12)


def test_cmi_is_the_closed_form_gaussian_kl_to_the_label_s_reference():
    rng = np.random.default_rng(1)
    n, classes, dim = 6, 3, 4
    mu = rng.normal(size=(n, dim))
    sigma = rng.uniform(0.2, 2.0, size=(n, dim))
    labels = np.array([0, 2, 1, 2, 0, 1])
    reference = ReferenceDistribution(classes, dim).double()
    with torch.no_grad():
        reference.r_mu.copy_(torch.from_numpy(rng.normal(size=(classes, dim))))
        reference.r_sigma.copy_(torch.from_numpy(rng.normal(size=(classes, dim))))
        reference.c.fill_(1.7)
    r_mu, r_sigma = reference.r_mu.detach().numpy(), reference.r_sigma.detach().numpy()
    c = 1.7
    total = 0.0
    for i in range(n):
        for d in range(dim):
            m1, s1 = c * mu[i, d], c * sigma[i, d]
            m2, s2 = r_mu[labels[i], d], softplus(r_sigma[labels[i], d])
            total += np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = cmi_loss(
        torch.from_numpy(mu), torch.from_numpy(sigma), torch.from_numpy(labels), reference
    )
    assert got.item() == pytest.approx(total / n, rel=1e-10)


def test_cmi_is_zero_when_the_posterior_is_the_reference():
    reference = ReferenceDistribution(2, 3)
    labels = torch.tensor([0, 1])
    sigma = torch.nn.functional.softplus(torch.ones(2, 3))  # r_sigma starts at 1
    assert cmi_loss(torch.zeros(2, 3), sigma, labels, reference).item() == pytest.approx(
        0, abs=1e-6
    )


def test_the_reparameterised_sample_has_the_posterior_s_mean_and_variance():
    mu = torch.tensor([[-1.0, 0.5, 3.0]]).expand(200_000, 3)
    sigma = torch.tensor([[0.3, 1.0, 2.5]]).expand(200_000, 3)
    generator = torch.Generator().manual_seed(0)
    z = reparameterize(mu, sigma, generator).numpy()
    # standard errors: sigma / sqrt(n) for the mean, about sigma^2 * sqrt(2 / n) for the var
    np.testing.assert_allclose(z.mean(axis=0), [-1.0, 0.5, 3.0], atol=0.02)
    np.testing.assert_allclose(z.var(axis=0), [0.09, 1.0, 6.25], rtol=0.02)
    mean, scale = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    eps = reparameterize(mean, scale, torch.Generator().manual_seed(1))
    grad_mean, grad_scale = torch.autograd.grad(eps.sum(), (mean, scale))
    assert torch.equal(grad_mean, torch.ones(3)) and torch.equal(grad_scale, eps.detach())


# The model ------------------------------------------------------------------------------------
def test_the_gaussian_model_keeps_the_base_names_and_adds_its_posterior_layer():
    base = set(get_weights(DigitCNN()))
    model = model_from_config({"model": "digit_cnn", EVAL_SAMPLES: 20})
    assert isinstance(model, GaussianModel) and model.z_dim == 100
    assert set(get_weights(model)) == base | {"posterior.weight", "posterior.bias"}
    assert model.posterior.weight.shape == (200, 100)
    assert type(model_from_config({"model": "digit_cnn"})) is DigitCNN
    mlp = GaussianModel(build_model("mlp", in_channels=16), 5)
    assert mlp.z_dim == 128 and mlp(torch.zeros(4, 16)).shape == (4, 10)


def test_evaluation_averages_the_class_probabilities_of_the_samples():
    torch.manual_seed(0)
    model = GaussianModel(build_model("mlp", in_channels=16), eval_samples=7).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))  # reproducible
        mu, sigma = model.distribution(x)
        generator = torch.Generator().manual_seed(0)
        probabilities = [
            torch.softmax(model.classify(reparameterize(mu, sigma, generator)), dim=1).numpy()
            for _ in range(7)
        ]
        assert torch.equal(model.features(x), mu)  # evaluation mode: the mean
    np.testing.assert_allclose(out.exp().numpy(), np.mean(probabilities, axis=0), rtol=1e-5)
    assert not np.allclose(probabilities[0], probabilities[1])  # the samples differ


def test_with_both_weights_zero_the_loss_is_cross_entropy_on_the_sampled_z():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 3, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    cfg = TrainConfig(local_steps=1, batch_size=16, seed=3, log_every=0)
    torch.manual_seed(0)
    model = GaussianModel(DigitCNN(), 20)
    replica = GaussianModel(DigitCNN(), 20)
    replica.load_state_dict(model.state_dict())
    reference = ReferenceDistribution(10, model.z_dim)
    regularizers = RepresentationRegularizers(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), 0.0, 0.0
    )
    fit = train_local(model, x, y, cfg, torch.device("cpu"), regularizers=regularizers)
    assert "l2r-loss" not in fit and "cmi-loss" not in fit
    # The same step by hand: the same seed draws the same dropout masks and the same eps.
    idx = next(batch_indices(len(x), 16, 1, cfg.seed))
    torch.manual_seed(cfg.seed)
    replica.train()
    with torch.no_grad():
        mu, sigma = replica.distribution(torch.from_numpy(x[idx]).float() / 127.5 - 1)
        z = mu + sigma * torch.randn(mu.shape)
        logits = replica.classify(z).double().numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -np.mean([log_p[i, label] for i, label in enumerate(y[idx])])
    assert fit["train-loss"] == pytest.approx(expected, rel=1e-5)
    assert torch.equal(reference.r_mu, torch.zeros(10, model.z_dim))  # no gradient reached r


def test_the_regularizers_add_their_terms_and_train_the_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 3, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    cfg = TrainConfig(local_steps=1, batch_size=16, seed=3, log_every=0)
    fits = {}
    for weights in ((0.0, 0.0), (0.5, 0.2)):
        torch.manual_seed(0)
        model = GaussianModel(DigitCNN(), 20)
        reference = ReferenceDistribution(10, model.z_dim)
        regularizers = RepresentationRegularizers(
            reference, torch.optim.SGD(reference.parameters(), lr=0.1), *weights
        )
        fits[weights] = train_local(
            model, x, y, cfg, torch.device("cpu"), regularizers=regularizers
        )
    both = fits[(0.5, 0.2)]
    plain = fits[(0.0, 0.0)]["train-loss"]
    expected = plain + 0.5 * both["l2r-loss"] + 0.2 * both["cmi-loss"]
    assert both["train-loss"] == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(reference.r_mu, torch.zeros(10, model.z_dim))


# The source's round on the in-process grid -----------------------------------------------------
def fedsr_config(cache, **extra) -> dict:
    wire = {**FedSRSettings().model_wire(), **FedSRSettings().to_wire()}
    return silo_config(cache, **{"local-steps": 3, **wire, **extra})


def test_the_source_replies_with_the_gaussian_model_and_keeps_r(digits_cache):
    torch.manual_seed(0)
    cfg = fedsr_config(digits_cache)
    sent = get_weights(model_from_config(cfg))
    context = make_context(5, {"domain": "mnist", "role": "source"})
    content = RecordDict({ARRAYS: to_record(sent), CONFIG: ConfigRecord(cfg)})
    reply = client_app(Message(content, 5, "train"), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    plain = set(get_weights(DigitCNN()))
    returned = from_record(reply.content[ARRAYS])
    assert set(returned) == plain | {"posterior.weight", "posterior.bias"}
    assert {k: v.shape for k, v in returned.items()} == {k: v.shape for k, v in sent.items()}
    assert set(reply.content.array_records) == {ARRAYS}  # no r_mu, r_sigma or c
    metrics = reply.content[METRICS]
    assert metrics["l2r-loss"] > 0 and metrics["cmi-loss"] > 0
    kept = from_record(context.state["fedsr-reference"])
    assert {k: v.shape for k, v in kept.items()} == {
        "r_mu": (10, 100),
        "r_sigma": (10, 100),
        "c": (1,),
    }
    assert not np.allclose(kept["r_mu"], 0)
    # Round 2 continues from the silo's own reference.
    content = RecordDict(
        {ARRAYS: reply.content[ARRAYS], CONFIG: ConfigRecord({**cfg, "server-round": 2})}
    )
    assert not client_app(Message(content, 5, "train"), context).has_error()
    later = from_record(context.state["fedsr-reference"])
    assert not np.allclose(later["r_mu"], kept["r_mu"])


def test_the_target_evaluates_the_gaussian_model(digits_cache):
    cfg = fedsr_config(digits_cache)
    torch.manual_seed(0)
    content = RecordDict(
        {ARRAYS: to_record(get_weights(model_from_config(cfg))), CONFIG: ConfigRecord(cfg)}
    )
    context = make_context(6, {"domain": "mnistm", "role": "target"})
    reply = client_app(Message(content, 6, "evaluate"), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0 <= reply.content[METRICS]["test-accuracy"] <= 1


# Settings -------------------------------------------------------------------------------------
def test_conf_shows_the_settings_defaults_and_the_registry_knows_fedsr():
    settings = strategy_settings(compose(["strategy=fedsr"]))
    assert settings == FedSRSettings()
    assert (settings.l2r_weight, settings.cmi_weight, settings.eval_samples) == (0.01, 5e-4, 20)
    assert STRATEGIES["fedsr"] is SiloFedAvg


def test_settings_survive_the_wire():
    settings = FedSRSettings(l2r_weight=0.1, cmi_weight=0.0, eval_samples=3)
    assert FedSRSettings.from_wire({**settings.model_wire(), **settings.to_wire()}) == settings
    assert FedSRSettings.from_wire({"proximal-mu": 0.1}) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.l2r_weight=-0.1", r"strategy\.l2r_weight must be >= 0"),
        ("strategy.cmi_weight=-1", r"strategy\.cmi_weight must be >= 0"),
        ("strategy.cmi_weight=much", r"strategy\.cmi_weight='much' is not a number"),
        ("strategy.eval_samples=0", r"strategy\.eval_samples must be >= 1"),
        ("strategy.eval_samples=2.5", r"strategy\.eval_samples=2.5 is not an integer"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose(["strategy=fedsr", override]))
    assert "\n" not in str(info.value)
