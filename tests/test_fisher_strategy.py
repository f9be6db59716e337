"""strategy=fisher / FisherAggregator: replies with Fisher records, validation, transport."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from client.app import app as client_app
from fedalign.config import compose, silos
from fedalign.fisher import diagonal_fisher, pack_float16, unpack_float16
from fedalign.models import DigitCNN, get_weights
from fedalign.protocol import (
    ARRAYS,
    FISHER,
    FISHER_SCALE,
    METRICS,
    from_record,
    to_config,
    to_record,
)
from fedalign.runlog import RunRecorder
from fedalign.settings.fedka import DisentangleSettings, FedKASettings
from fedalign.settings.fisher import FisherMergeSettings, FisherSettings
from fedalign.train import to_input
from server.discovery import discover_silos
from server.grid import MeteredGrid
from strategies.fedavg import SiloFedAvg
from strategies.fedka import FedKA
from strategies.fisher import FisherAggregator
from strategies.registry import assemble
from tests.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "target")}


def model_weights(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(DigitCNN())


PARAMS = {name for name, _ in DigitCNN().named_parameters()}


def reply(seed: int, examples: int, fisher: dict | None, scale: dict | None = None) -> Message:
    content = RecordDict(
        {
            ARRAYS: to_record(model_weights(seed)),
            METRICS: MetricRecord({"num-examples": examples, "train-loss": float(seed)}),
        }
    )
    if fisher is not None:
        content[FISHER] = to_record(fisher)
    if scale is not None:
        content[FISHER_SCALE] = to_record(scale)
    return Message(content, 1, "train")


def ones_fisher(value: float = 1.0) -> dict[str, np.ndarray]:
    return {
        n: np.full(a.shape, value, np.float32) for n, a in model_weights(0).items() if n in PARAMS
    }


def merge(replies, **settings):
    aggregator = FisherAggregator(FisherSettings(**settings), PARAMS)
    return aggregator(1, replies, [f"silo{i}" for i in range(len(replies))])


def test_equal_fishers_reduce_to_fedavg():
    replies = [reply(1, 100, ones_fisher(0.3)), reply(2, 300, ones_fisher(0.3))]
    arrays, metrics = merge(replies, normalize=False)
    # Flower's FedAvg would add the fisher record into the model: average the weights only.
    weights_only = [RecordDict({k: r.content[k] for k in (ARRAYS, METRICS)}) for r in replies]
    fedavg = aggregate_arrayrecords(weights_only, "num-examples")
    for name, array in arrays.items():
        np.testing.assert_allclose(array.numpy(), fedavg[name].numpy(), rtol=1e-5, atol=1e-7)
    assert metrics["fisher-silos"] == 2
    assert metrics["train-loss"] == pytest.approx(1 * 0.25 + 2 * 0.75)


def test_batchnorm_statistics_are_averaged_by_examples_not_fisher():
    fisher_a, fisher_b = ones_fisher(1.0), ones_fisher(1.0)
    fisher_a["encoder.0.weight"] *= 1000  # silo a dominates this conv weight only
    a, b = reply(1, 100, fisher_a), reply(2, 300, fisher_b)
    wa, wb = from_record(a.content[ARRAYS]), from_record(b.content[ARRAYS])
    wa["encoder.1.running_mean"] = np.full(64, 4.0, np.float32)
    wb["encoder.1.running_mean"] = np.full(64, 8.0, np.float32)
    a.content[ARRAYS], b.content[ARRAYS] = to_record(wa), to_record(wb)
    arrays, _ = merge([a, b], normalize=False)
    np.testing.assert_allclose(arrays["encoder.1.running_mean"].numpy(), 0.25 * 4 + 0.75 * 8)
    merged = arrays["encoder.0.weight"].numpy()
    expected = (0.25 * 1000 * wa["encoder.0.weight"] + 0.75 * wb["encoder.0.weight"]) / (
        0.25 * 1000 + 0.75
    )
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-7)
    fedavg_like = arrays["encoder.4.weight"].numpy()  # equal Fishers there: plain weighting
    np.testing.assert_allclose(
        fedavg_like,
        0.25 * wa["encoder.4.weight"] + 0.75 * wb["encoder.4.weight"],
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (lambda f: None, "no fisher record"),
        (
            lambda f: {k: v for k, v in f.items() if k != "head.3.bias"},
            "fisher names ['head.3.bias'] do not match",
        ),
        (
            lambda f: {**f, "head.3.bias": np.ones(3, np.float32)},
            "fisher 'head.3.bias' has shape [3]",
        ),
        (
            lambda f: {**f, "head.3.bias": np.full(10, np.nan, np.float32)},
            "fisher 'head.3.bias' has negative or non-finite",
        ),
        (
            lambda f: {**f, "head.3.bias": -np.ones(10, np.float32)},
            "fisher 'head.3.bias' has negative or non-finite",
        ),
    ],
)
def test_malformed_fisher_leaves_that_silo_out(broken, expected, caplog):
    good, bad = reply(1, 100, ones_fisher()), reply(2, 100, broken(ones_fisher()))
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        arrays, metrics = merge([good, bad])
    assert f"round 1: silo1 left out of the Fisher merge: {expected}" in caplog.text
    assert metrics["fisher-silos"] == 1
    for name, array in arrays.items():  # the good silo alone
        np.testing.assert_allclose(
            array.numpy(), from_record(good.content[ARRAYS])[name], rtol=1e-5
        )


def test_no_usable_fisher_keeps_the_model(caplog):
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        assert merge([reply(1, 100, None)]) == (None, None)
    assert "no usable Fisher" in caplog.text


def test_float16_transport_keeps_small_fishers():
    model = DigitCNN()
    x = to_input(np.random.default_rng(0).integers(0, 255, (64, 3, 28, 28), np.uint8), "cpu")
    fisher = diagonal_fisher(model, [x], n_examples=64)
    halves, scales = pack_float16(fisher)
    back = unpack_float16(halves, scales)
    for name, values in fisher.items():
        big = values >= values.max() * 1e-3
        np.testing.assert_allclose(back[name][big], values[big], rtol=1e-3)
    naive_zero = sum(int((v.astype(np.float16) == 0).sum()) for v in fisher.values())
    packed_zero = sum(int((h == 0).sum()) for h in halves.values())
    assert packed_zero < naive_zero  # a plain float16 cast would lose more entries
    bad_scale = {k: np.array([1.0, 2.0], np.float32) for k in scales}
    assert "fisher-scale does not match" in fisher_problem(halves, bad_scale)


def fisher_problem(halves, scales) -> str:
    aggregator = FisherAggregator(FisherSettings(), PARAMS)
    return aggregator.fisher_of(reply(1, 10, halves, scales))


def run_strategy(tmp_path, cache, strategy_cls, settings, aggregator, rounds=2):
    nodes = {nid: {"domain": d, "role": r, "data-dir": str(cache)} for nid, (d, r) in NODES.items()}
    grid = MeteredGrid(InProcessGrid(client_app, nodes))
    cfg = compose(["data.domains=[mnist,usps,mnistm]"])
    roster = discover_silos(grid, silos(cfg), timeout=10, data_config={})
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    strategy = assemble(strategy_cls, settings, roster, recorder, rounds, aggregator)
    train = to_config(
        {
            "data-cache-dir": str(cache),
            "model": "digit_cnn",
            "device": "cpu",
            "local-steps": 10,
            "batch-size": 32,
            "lr": 1e-3,
        }
    )
    strategy.start(grid, to_record(model_weights(0)), rounds, 60, train, train)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return strategy, [json.loads(line) for line in lines], grid


def test_fisher_merge_rounds_in_process(tmp_path, digits_cache):
    fisher = FisherSettings(samples=64, transport="float16")
    aggregator = FisherAggregator(fisher, PARAMS)
    settings = FisherMergeSettings(fisher=fisher)
    _, lines, _ = run_strategy(tmp_path, digits_cache, SiloFedAvg, settings, aggregator)
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert lines[-1]["target_accuracy"] > lines[0]["target_accuracy"]
    assert lines[1]["silos"]["mnist"]["fisher-seconds"] > 0


def test_fedka_can_merge_by_fisher(tmp_path, digits_cache, caplog):
    fisher = FisherSettings(samples=32)
    aggregator = FisherAggregator(fisher, PARAMS)
    settings = FedKASettings(
        aggregation="fisher",
        fisher=fisher,
        start_from="finetuned",
        mmd_weight=1.0,
        disentangle=DisentangleSettings(enabled=False),
        vote_target_stats=False,
        embed_samples=32,
        vote_samples=128,
        finetune_steps=4,
    )
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        strategy, lines, _ = run_strategy(
            tmp_path, digits_cache, FedKA, settings, aggregator, rounds=1
        )
    assert "left out of the Fisher merge" not in caplog.text
    assert isinstance(lines[-1]["vote_agreement"], float)
    assert set(strategy.source_models) == {"mnist", "usps"}
