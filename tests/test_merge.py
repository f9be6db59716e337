"""Fisher-weighted merging, buffer averaging and the parameter/buffer split."""

from __future__ import annotations

import numpy as np
import pytest

from fedalign.merge import average_buffers, fisher_merge, split_fisher_weights
from fedalign.models import DigitCNN, get_weights

SHAPES = [(4, 3), (5,), ()]


def random_silos(k: int, seed: int = 0, dtype: type = np.float32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape).astype(dtype) for shape in SHAPES] for _ in range(k)]


def random_fishers(k: int, seed: int = 1) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.random(shape).astype(np.float32) for shape in SHAPES] for _ in range(k)]


def weighted_average(params: list[list[np.ndarray]], counts: list[float]) -> list[np.ndarray]:
    lambdas = np.asarray(counts, dtype=np.float64) / sum(counts)
    return [
        sum(lam * silo[j].astype(np.float64) for lam, silo in zip(lambdas, params, strict=True))
        for j in range(len(params[0]))
    ]


def assert_arrays_close(a: list[np.ndarray], b: list[np.ndarray], **tolerance: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, **tolerance)


@pytest.mark.parametrize("counts", [None, [10.0, 30.0, 60.0]])
def test_equal_fishers_reduce_to_fedavg(counts):
    params = random_silos(3)
    shared = random_fishers(1)[0]
    merged = fisher_merge(params, [shared] * 3, weights=counts)
    expected = weighted_average(params, counts or [1.0, 1.0, 1.0])
    assert_arrays_close(merged, expected, rtol=1e-6, atol=1e-6)


def test_floor_decides_where_no_silo_has_information():
    params = random_silos(2)
    fishers = random_fishers(2)
    for silo in fishers:
        silo[0][1] = 0.0
    merged = fisher_merge(params, fishers, weights=[1.0, 3.0])
    expected = 0.25 * params[0][0][1] + 0.75 * params[1][0][1]
    np.testing.assert_allclose(merged[0][1], expected, rtol=1e-6)


def test_huge_fisher_dominates_its_entry_only():
    params = random_silos(3)
    fishers = [[np.ones(shape, dtype=np.float32) for shape in SHAPES] for _ in range(3)]
    fishers[2][0][1, 2] = 1e9
    merged = fisher_merge(params, fishers)
    np.testing.assert_allclose(merged[0][1, 2], params[2][0][1, 2], rtol=1e-6)
    average = weighted_average(params, [1.0, 1.0, 1.0])
    others = np.ones((4, 3), dtype=bool)
    others[1, 2] = False
    np.testing.assert_allclose(merged[0][others], average[0][others], rtol=1e-5, atol=1e-6)
    assert_arrays_close(merged[1:], average[1:], rtol=1e-5, atol=1e-6)


def test_normalize_matches_hand_computation():
    params = [[np.zeros(4, dtype=np.float32)], [np.ones(4, dtype=np.float32)]]
    fishers = [[np.ones(4, dtype=np.float32)], [np.array([3.0, 0.0, 0.0, 4.0], np.float32)]]
    # Fisher norms 2 and 5; lambdas (0.25, 0.75) -> (0.125, 0.15), renormalised.
    plain = fisher_merge(params, fishers, weights=[1.0, 3.0], floor=1e-6)[0]
    normalized = fisher_merge(params, fishers, weights=[1.0, 3.0], normalize=True)[0]
    lam0, lam1 = 0.125 / 0.275, 0.15 / 0.275
    f1 = np.array([3.0, 1e-6, 1e-6, 4.0])
    np.testing.assert_allclose(normalized, lam1 * f1 / (lam0 + lam1 * f1), rtol=1e-6)
    np.testing.assert_allclose(plain, 0.75 * f1 / (0.25 + 0.75 * f1), rtol=1e-6)
    # The silo with the larger Fisher loses weight: entries move towards silo 0 (zeros).
    assert (normalized <= plain).all() and (normalized[[0, 3]] < plain[[0, 3]]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_and_shape_kept(dtype):
    merged = fisher_merge(random_silos(2, dtype=dtype), random_fishers(2))
    assert [m.dtype for m in merged] == [np.dtype(dtype)] * len(SHAPES)
    assert [m.shape for m in merged] == SHAPES


def test_float16_transported_fisher_is_close():
    rng = np.random.default_rng(2)
    params = random_silos(4)
    fishers = [
        [np.exp(rng.normal(-6.0, 3.0, shape)).astype(np.float32) for shape in SHAPES]
        for _ in range(4)
    ]
    half = [[f.astype(np.float16) for f in silo] for silo in fishers]
    reference = fisher_merge(params, fishers)
    restored = [[f.astype(np.float32) for f in silo] for silo in half]
    assert_arrays_close(fisher_merge(params, restored), reference, rtol=0, atol=5e-3)
    assert_arrays_close(fisher_merge(params, half), reference, rtol=0, atol=5e-3)


def bad_inputs() -> list:
    cases = []

    def case(name, mutate, message):
        params, fishers, weights = random_silos(3), random_fishers(3), [1.0, 2.0, 3.0]
        mutate(params, fishers, weights)
        cases.append(pytest.param(params, fishers, weights, message, id=name))

    def set_item(silo_list, i, j, value):
        silo_list[i][j] = silo_list[i][j].copy()
        silo_list[i][j].reshape(-1)[0] = value

    case("shape", lambda p, f, w: p[1].__setitem__(2, np.zeros(2, np.float32)), "silo 1, array 2")
    case(
        "fisher-shape",
        lambda p, f, w: f[2].__setitem__(1, np.ones(3, np.float32)),
        "silo 2, array 1",
    )
    case(
        "negative", lambda p, f, w: set_item(f, 1, 0, -1.0), "silo 1, array 0: Fisher has negative"
    )
    case("fisher-nan", lambda p, f, w: set_item(f, 2, 1, np.nan), "silo 2, array 1: Fisher has NaN")
    case("fisher-inf", lambda p, f, w: set_item(f, 0, 0, np.inf), "silo 0, array 0: Fisher")
    case("param-nan", lambda p, f, w: set_item(p, 1, 2, np.nan), "silo 1, array 2: non-finite")
    case("param-inf", lambda p, f, w: set_item(p, 2, 0, -np.inf), "silo 2, array 0: non-finite")
    case("k-fisher", lambda p, f, w: f.pop(), "3 silos of parameters but 2 of Fisher")
    case("k-weights", lambda p, f, w: w.pop(), "2 silo weights for 3 silos")
    case("count", lambda p, f, w: p[2].pop(), "silo 2: 2 arrays")
    case("weight", lambda p, f, w: w.__setitem__(1, 0.0), "silo 1: weight")
    return cases


@pytest.mark.parametrize(("params", "fishers", "weights", "message"), bad_inputs())
def test_bad_inputs_raise_one_line(params, fishers, weights, message):
    with pytest.raises(ValueError, match=message) as error:
        fisher_merge(params, fishers, weights=weights)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("floor", [0.0, -1.0, 1e-31, float("nan")])
def test_a_floor_below_the_settings_minimum_is_refused(floor):
    with pytest.raises(ValueError, match=r"floor must be >= 1e-30"):
        fisher_merge(random_silos(2), random_fishers(2), floor=floor)


def test_no_silos_and_zero_fisher_norm_raise():
    with pytest.raises(ValueError, match="no silos"):
        fisher_merge([], [])
    params = random_silos(2)
    fishers = [[np.zeros(s, np.float32) for s in SHAPES], random_fishers(1)[0]]
    with pytest.raises(ValueError, match="silo 0: Fisher is all zero"):
        fisher_merge(params, fishers, normalize=True)
    fishers[0][1][2] = np.nan
    with pytest.raises(ValueError, match="silo 0, array 1: Fisher norm is not finite"):
        fisher_merge(params, fishers, normalize=True)


def test_average_buffers_weights_by_count():
    buffers = random_silos(3, seed=5)
    counts = [100.0, 50.0, 850.0]
    merged = average_buffers(buffers, counts)
    assert_arrays_close(merged, weighted_average(buffers, counts), rtol=1e-6, atol=1e-6)
    assert [m.dtype for m in merged] == [np.dtype(np.float32)] * len(SHAPES)


def test_split_fisher_weights_separates_batchnorm_buffers():
    model = DigitCNN()
    weights = get_weights(model)
    names = {name for name, _ in model.named_parameters()}
    parameters, buffers = split_fisher_weights(weights, names)
    assert list(parameters) == [name for name, _ in model.named_parameters()]
    assert list(buffers) == [n for n in weights if n.endswith(("running_mean", "running_var"))]
    assert len(buffers) == 6
    assert list(parameters) == [name for name in weights if name in names]
    with pytest.raises(ValueError, match="missing"):
        split_fisher_weights(buffers, names)
