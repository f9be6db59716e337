"""The ClientApp's handlers on real records and real (cached) data, in process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from fedalign.models import build_model, get_weights
from fedalign.protocol import ARRAYS, CONFIG, METRICS, SILO, from_record, to_record
from tests.conftest import make_context, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")


def train_config(cache, **extra) -> ConfigRecord:
    return ConfigRecord(silo_config(cache, **extra))


def initial_weights(name: str = "digit_cnn") -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return get_weights(build_model(name))


def send(message_type: str, node_config: dict, content: RecordDict) -> Message:
    message = Message(content, 7, message_type)
    return client_app(message, make_context(7, node_config))


def test_info_reports_identity_and_counts_only(digits_cache):
    reply = send(
        "query.info",
        {"domain": "usps", "role": "source"},
        RecordDict({CONFIG: train_config(digits_cache)}),
    )
    assert not reply.has_error()
    assert dict(reply.content[SILO]) == {"domain": "usps", "role": "source"}
    assert reply.content[METRICS]["num-train"] + reply.content[METRICS]["num-test"] == 1797
    assert len(reply.content.array_records) == 0


def test_train_returns_updated_weights_and_metrics(digits_cache):
    weights = initial_weights()
    content = RecordDict({ARRAYS: to_record(weights), CONFIG: train_config(digits_cache)})
    reply = send("train", {"domain": "mnist", "role": "source"}, content)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    new = from_record(reply.content[ARRAYS])
    assert new.keys() == weights.keys()
    assert all(new[k].shape == weights[k].shape and new[k].dtype == weights[k].dtype for k in new)
    assert any(not np.allclose(new[k], weights[k]) for k in new)
    metrics = reply.content[METRICS]
    assert metrics["num-examples"] == 2000
    assert 0.0 <= metrics["received-test-accuracy"] <= 1.0
    assert metrics["train-loss"] > 0


def test_training_improves_the_silo_model(digits_cache):
    weights = initial_weights()
    cfg = train_config(digits_cache, **{"local-steps": 40})
    reply = send(
        "train",
        {"domain": "mnist", "role": "source"},
        RecordDict({ARRAYS: to_record(weights), CONFIG: cfg}),
    )
    trained = from_record(reply.content[ARRAYS])
    before = send(
        "evaluate",
        {"domain": "mnist", "role": "source"},
        RecordDict({ARRAYS: to_record(weights), CONFIG: cfg}),
    )
    after = send(
        "evaluate",
        {"domain": "mnist", "role": "source"},
        RecordDict({ARRAYS: to_record(trained), CONFIG: cfg}),
    )
    assert after.content[METRICS]["test-accuracy"] > before.content[METRICS]["test-accuracy"] + 0.2


def test_evaluate_on_target_silo(digits_cache):
    content = RecordDict({ARRAYS: to_record(initial_weights()), CONFIG: train_config(digits_cache)})
    reply = send("evaluate", {"domain": "mnistm", "role": "target"}, content)
    metrics = reply.content[METRICS]
    assert metrics["num-examples"] == 500
    assert 0.0 <= metrics["test-accuracy"] <= 1.0
    assert len(reply.content.array_records) == 0


@pytest.mark.parametrize(
    ("node_config", "expected"),
    [
        ({"domain": "nope", "role": "source"}, "unknown domain 'nope'"),
        ({"domain": "mnist", "role": "boss"}, "role='boss' is unknown"),
        ({"partition-id": 0}, "simulation needs the run config"),
        ({}, "names no domain"),
        ({"domain": "mnistm", "role": "target"}, "only sources do"),
    ],
)
def test_operator_errors_become_one_line_error_replies(digits_cache, node_config, expected):
    content = RecordDict({ARRAYS: to_record(initial_weights()), CONFIG: train_config(digits_cache)})
    reply = send("train", node_config, content)
    assert reply.has_error()
    assert expected in reply.error.reason
    assert "\n" not in reply.error.reason


def test_mismatched_model_is_refused(digits_cache):
    weights = initial_weights()
    weights["head.3.weight"] = np.zeros((5, 100), dtype=np.float32)
    content = RecordDict({ARRAYS: to_record(weights), CONFIG: train_config(digits_cache)})
    reply = send("evaluate", {"domain": "mnist", "role": "source"}, content)
    assert reply.has_error()
    assert "head.3.weight" in reply.error.reason and "\n" not in reply.error.reason


def test_simulation_partition_maps_to_configured_silo(digits_cache):
    import json

    run_config = {
        "config-json": json.dumps(
            {"data": {"domains": ["mnist", "usps", "mnistm"], "target": "mnistm"}}
        )
    }
    message = Message(RecordDict({CONFIG: train_config(digits_cache)}), 3, "query.info")
    reply = client_app(message, make_context(3, {"partition-id": 2}, run_config))
    assert dict(reply.content[SILO]) == {"domain": "mnistm", "role": "target"}
