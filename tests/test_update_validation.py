"""Train replies are checked before aggregation; bad ones never reach the global model.

Each test corrupts one source's real reply on its way back to the server (NaN, Inf, a wrong
shape, a wrong dtype, an extra or a missing array, a huge update) and checks that the global model
after the round is exactly what the honest silos alone produce. Robust aggregators (Flower's
FedMedian, FedTrimmedAvg, Krum) are checked against an unbounded poisoned update.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from client.app import app as client_app
from fedalign.config import ConfigError, compose, silos, validate
from fedalign.models import build_model, get_weights
from fedalign.protocol import ARRAYS, to_config, to_record
from fedalign.runlog import RunRecorder
from server.discovery import discover_silos
from server.grid import MeteredGrid
from strategies.registry import build_strategy
from tests.conftest import InProcessGrid, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")

HONEST = {11: "mnist", 13: "syn"}
NODES = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("syn", "source")}
NODES[14] = ("mnistm", "target")
LAYER = "head.3.weight"


def scaled(arrays: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {k: a * factor if a.dtype.kind == "f" else a for k, a in arrays.items()}


CORRUPTIONS = {
    "nan": (lambda a: {**a, LAYER: np.full_like(a[LAYER], np.nan)}, "non-finite"),
    "inf": (lambda a: {**a, LAYER: np.full_like(a[LAYER], np.inf)}, "non-finite"),
    "wrong shape": (lambda a: {**a, LAYER: a[LAYER][:, :5]}, "expected float32[10, 100]"),
    "wrong dtype": (lambda a: {**a, LAYER: a[LAYER].astype(np.float64)}, "is float64"),
    "extra array": (lambda a: {**a, "backdoor": np.ones(3, np.float32)}, "do not match"),
    "missing array": (lambda a: {k: v for k, v in a.items() if k != LAYER}, "do not match"),
    "huge norm": (lambda a: scaled(a, 1e4), "exceeds updates.max_norm=100"),
}


def run_round(tmp_path, cache, corrupt, overrides=()):
    """One round on three sources; usps's train reply passes through ``corrupt``."""
    honest: dict[str, dict[str, np.ndarray]] = {}

    def intercept(message: Message, reply: Message) -> Message:
        if message.metadata.message_type != "train" or reply.has_error():
            return reply
        arrays = {k: a.numpy() for k, a in reply.content[ARRAYS].items()}
        node = message.metadata.dst_node_id
        if node in HONEST:
            honest[HONEST[node]] = arrays
            return reply
        content = RecordDict(dict(reply.content.items()))
        content[ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in corrupt(arrays).items()})
        return Message(content, reply_to=message)

    nodes = {n: {"domain": d, "role": r, "data-dir": str(cache)} for n, (d, r) in NODES.items()}
    grid = InProcessGrid(client_app, nodes, intercept=intercept)
    cfg = compose(
        ["data.domains=[mnist,usps,syn,mnistm]", "wandb.mode=disabled", "rounds=1", *overrides]
    )
    validate(cfg)
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    metered = MeteredGrid(grid)
    roster = discover_silos(metered, silos(cfg), timeout=10, data_config={})
    strategy = build_strategy(cfg, roster, recorder)
    torch.manual_seed(0)
    strategy.start(
        grid=metered,
        initial_arrays=to_record(get_weights(build_model("digit_cnn"))),
        num_rounds=1,
        timeout=60,
        train_config=to_config(silo_config(cache, **{"local-steps": 5})),
        evaluate_config=to_config(silo_config(cache)),
    )
    final = {k: a.numpy() for k, a in strategy.final_arrays.items()}
    return final, honest


def weighted_mean(honest: dict[str, dict[str, np.ndarray]], counts: dict[str, int]):
    total = sum(counts.values())
    names = honest["mnist"]
    return {
        k: sum(honest[d][k].astype(np.float64) * counts[d] for d in honest) / total
        for k in names
        if names[k].dtype.kind == "f"
    }


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_update_is_dropped_and_never_reaches_the_global_model(
    tmp_path, digits_cache, caplog, kind
):
    corrupt, reason = CORRUPTIONS[kind]
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        final, honest = run_round(tmp_path, digits_cache, corrupt, ["updates.max_norm=100"])
    assert "round 1: dropped reply from usps:" in caplog.text
    assert reason in caplog.text
    expected = weighted_mean(honest, {"mnist": 2000, "syn": 2000})
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6)


def test_an_honest_update_passes_the_norm_bound(tmp_path, digits_cache, caplog):
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        run_round(tmp_path, digits_cache, lambda a: a, ["updates.max_norm=100"])
    assert "dropped reply" not in caplog.text


@pytest.mark.parametrize(
    "robust",
    [
        ["updates.robust=median"],
        ["updates.robust=trimmed_mean", "updates.trim_beta=0.34"],
        ["updates.robust=krum", "updates.num_malicious=1"],
    ],
    ids=["median", "trimmed_mean", "krum"],
)
def test_robust_aggregators_resist_a_poisoned_update(tmp_path, digits_cache, robust):
    final, honest = run_round(tmp_path, digits_cache, lambda a: scaled(a, 1e3), robust)
    for name, value in final.items():
        if value.dtype.kind != "f":
            continue
        low = np.minimum(honest["mnist"][name], honest["syn"][name])
        high = np.maximum(honest["mnist"][name], honest["syn"][name])
        assert np.all(value >= low - 1e-6) and np.all(value <= high + 1e-6), name
    if robust[0] == "updates.robust=krum":  # Krum picks one honest update whole
        assert any(
            all(np.array_equal(final[k], honest[d][k]) for k in final) for d in ("mnist", "syn")
        )


def test_poisoned_update_without_a_bound_does_move_fedavg(tmp_path, digits_cache):
    final, honest = run_round(tmp_path, digits_cache, lambda a: scaled(a, 1e3))
    assert np.abs(final[LAYER]).max() > 10 * np.abs(honest["mnist"][LAYER]).max()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["updates.robust=mean"], "updates.robust='mean' (known: none, median"),
        (["updates.max_norm=-1"], "updates.max_norm must be >= 1e-12"),
        (["updates.trim_beta=0.5"], "updates.trim_beta=0.5 must be in [0, 0.5)"),
        (["strategy=fisher", "updates.robust=krum"], "merges by Fisher; use updates.robust=none"),
    ],
)
def test_bad_update_settings_get_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(overrides))
