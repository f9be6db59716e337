"""Permutation weight matching (fedalign/permute.py) against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedalign.merge import fisher_merge
from fedalign.models import build_model, get_weights, set_weights
from fedalign.permute import (
    Axis,
    apply_permutation,
    permutation_spec,
    permute_axis,
    weight_matching,
)

INPUTS = {"digit_cnn": (3, 28, 28), "mlp": (64,)}


def random_model(name: str, seed: int) -> torch.nn.Module:
    """A model with random BatchNorm affine parameters and running statistics, so that a
    permutation missing any of them would change the function."""
    torch.manual_seed(seed)
    model = build_model(name, in_channels=INPUTS[name][0])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.weight.data = torch.rand(n) + 0.5
            module.bias.data = torch.randn(n)
            module.running_mean = torch.randn(n)
            module.running_var = torch.rand(n) + 0.5
    return model.eval()


def random_perms(spec, weights, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.permutation(weights[axes[0].tensor].shape[axes[0].axis] // axes[0].block)
        for name, axes in spec.items()
    }


def outputs(name: str, weights: dict[str, np.ndarray]) -> np.ndarray:
    model = build_model(name, in_channels=INPUTS[name][0])
    set_weights(model, weights)
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(16, *INPUTS[name])))
    with torch.no_grad():
        return model.eval()(x.float()).numpy()


@pytest.mark.parametrize("name", ["digit_cnn", "mlp"])
def test_a_permuted_copy_computes_the_same_function(name):
    weights = get_weights(random_model(name, 0))
    spec = permutation_spec(name, weights)
    permuted = apply_permutation(spec, random_perms(spec, weights, 1), weights)
    assert any(not np.array_equal(permuted[k], weights[k]) for k in weights)
    np.testing.assert_allclose(outputs(name, permuted), outputs(name, weights), atol=1e-5)


@pytest.mark.parametrize("name", ["digit_cnn", "mlp"])
def test_matching_recovers_a_random_permutation_exactly(name):
    model = random_model(name, 2)
    weights = get_weights(model)
    parameters = {n for n, _ in model.named_parameters()}
    spec = permutation_spec(name, weights)
    scrambled = random_perms(spec, weights, 3)
    copy = apply_permutation(spec, scrambled, weights)
    perms = weight_matching(
        spec,
        {n: a for n, a in weights.items() if n in parameters},
        {n: a for n, a in copy.items() if n in parameters},
    )
    for perm_name, perm in scrambled.items():  # copy[i] = weights[perm[i]]: undone by argsort
        np.testing.assert_array_equal(perms[perm_name], np.argsort(perm))
    aligned = apply_permutation(spec, perms, copy)
    for tensor, values in weights.items():  # running statistics included
        np.testing.assert_array_equal(aligned[tensor], values, err_msg=tensor)
    np.testing.assert_allclose(outputs(name, aligned), outputs(name, weights), atol=1e-5)


def test_merging_a_model_with_its_matched_permuted_copy_gives_the_model():
    model = random_model("digit_cnn", 4)
    weights = get_weights(model)
    params = [n for n, _ in model.named_parameters()]
    spec = permutation_spec("digit_cnn", weights)
    copy = apply_permutation(spec, random_perms(spec, weights, 5), weights)
    perms = weight_matching(spec, {n: weights[n] for n in params}, {n: copy[n] for n in params})
    aligned = apply_permutation(spec, perms, copy)
    rng = np.random.default_rng(6)
    fishers = [[rng.random(weights[n].shape, np.float32) for n in params] for _ in range(2)]
    merged = fisher_merge([[weights[n] for n in params], [aligned[n] for n in params]], fishers)
    for n, values in zip(params, merged, strict=True):
        np.testing.assert_allclose(values, weights[n], rtol=1e-5, atol=1e-7)
    unmatched = fisher_merge([[weights[n] for n in params], [copy[n] for n in params]], fishers)
    assert not np.allclose(unmatched[0], weights[params[0]], atol=1e-3)


def test_permute_axis_in_blocks_against_a_loop():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(3, 4 * 5))  # 4 units of 5 positions each along axis 1
    perm = np.array([2, 0, 3, 1])
    expected = np.empty_like(array)
    for i in range(4):
        for s in range(5):
            expected[:, i * 5 + s] = array[:, perm[i] * 5 + s]
    np.testing.assert_array_equal(permute_axis(array, Axis("w", 1, block=5), perm), expected)


def test_one_hidden_layer_matching_is_the_best_permutation_by_brute_force():
    rng = np.random.default_rng(1)
    spec = {"h": (Axis("w1", 0), Axis("b1", 0), Axis("w2", 1))}
    a = {"w1": rng.normal(size=(6, 3)), "b1": rng.normal(size=6), "w2": rng.normal(size=(2, 6))}
    b = {k: rng.normal(size=v.shape) for k, v in a.items()}

    def similarity(perm):
        return (
            sum(a["w1"][i] @ b["w1"][perm[i]] for i in range(6))
            + sum(a["b1"][i] * b["b1"][perm[i]] for i in range(6))
            + sum(a["w2"][:, i] @ b["w2"][:, perm[i]] for i in range(6))
        )

    best = max(itertools.permutations(range(6)), key=similarity)
    assert tuple(weight_matching(spec, a, b)["h"]) == best


def test_a_model_without_a_spec_is_refused():
    with pytest.raises(ValueError, match="no permutation spec for model 'resnet18'"):
        permutation_spec("resnet18", {})
