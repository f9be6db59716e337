"""FedKA and FedVote: target-silo handlers, source alignment, the strategy, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict
from torch import nn

from client.app import app as client_app
from fedalign.config import Silo, compose, silos
from fedalign.errors import FederationError
from fedalign.models import build_model, get_weights
from fedalign.protocol import (
    ARRAYS,
    CONFIG,
    EMBEDDINGS,
    METRICS,
    from_record,
    source_model_key,
    to_config,
    to_record,
)
from fedalign.runlog import RunRecorder
from fedalign.settings.fedka import DisentangleSettings, FedKASettings
from fedalign.workspace import predict
from server.discovery import discover_silos
from server.grid import MeteredGrid
from strategies.fedka import FedKA
from strategies.registry import assemble
from tests.conftest import InProcessGrid, make_context, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "target")}
TARGET = {"embed-samples": 64, "vote-samples": 256, "finetune-steps": 8, "kernel-num": 5}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(build_model("digit_cnn"))


def call(message_type: str, node: tuple[str, str], content: RecordDict, context=None):
    domain, role = node
    context = context or make_context(5, {"domain": domain, "role": role})
    return client_app(Message(content, 5, message_type), context)


# Target-silo handlers -----------------------------------------------------------------------
def test_embed_returns_m_embeddings_and_the_target_accuracy(digits_cache):
    content = RecordDict(
        {ARRAYS: to_record(weights()), CONFIG: ConfigRecord(silo_config(digits_cache, **TARGET))}
    )
    reply = call("query.embed", ("mnistm", "target"), content)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    embeddings = from_record(reply.content[EMBEDDINGS])[EMBEDDINGS]
    assert embeddings.shape == (64, 800) and embeddings.dtype == np.float32
    assert 0 <= reply.content[METRICS]["test-accuracy"] <= 1
    assert ARRAYS not in reply.content.array_records


def test_vote_fine_tunes_and_reports_vote_statistics(digits_cache):
    trained = {}
    for domain in ("mnist", "usps"):
        content = RecordDict(
            {ARRAYS: to_record(weights()), CONFIG: ConfigRecord(silo_config(digits_cache))}
        )
        trained[domain] = call("train", (domain, "source"), content).content[ARRAYS]
    cfg = silo_config(digits_cache, alpha=1.0, **TARGET)
    content = RecordDict({ARRAYS: to_record(weights()), CONFIG: ConfigRecord(cfg)})
    for domain, record in trained.items():
        content[source_model_key(domain)] = record
    reply = call("train.vote", ("mnistm", "target"), content)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[METRICS]
    for key in ("agreement", "kept-fraction", "pseudo-label-accuracy", "group-effect"):
        assert key in metrics
    assert 0.5 <= metrics["agreement"] <= 1.0  # with 2 voters the winner has >= half the votes
    assert metrics["kept-fraction"] == 1.0  # tau = 0 keeps every sample
    assert {"model-mnist-test-accuracy", "model-usps-test-accuracy"} <= set(metrics)
    tuned = from_record(reply.content[ARRAYS])
    assert any(not np.allclose(tuned[k], v) for k, v in weights().items())
    assert from_record(reply.content[EMBEDDINGS])[EMBEDDINGS].shape == (64, 800)


def test_vote_threshold_drops_disagreeing_samples(digits_cache):
    cfg = silo_config(digits_cache, alpha=1.0, **{**TARGET, "min-agreement": 1.0})
    content = RecordDict({ARRAYS: to_record(weights()), CONFIG: ConfigRecord(cfg)})
    content[source_model_key("a")] = to_record(weights(1))
    content[source_model_key("b")] = to_record(weights(2))
    reply = call("train.vote", ("mnistm", "target"), content)
    kept = reply.content[METRICS]["kept-fraction"]
    assert 0.0 <= kept < 1.0  # two random models rarely agree everywhere


def test_target_statistics_vote_normalises_by_the_batch_and_leaves_models_alone():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model[2].bias.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 1, 2, 2), dtype=np.uint8)
    x[:, 0, 0, 0] = np.where(np.arange(64) % 2 == 0, 200, 255)  # far above running mean 0
    cpu = torch.device("cpu")
    running = predict({"a": model}, x, cpu)
    adapted = predict({"a": model}, x, cpu, target_stats=True)
    np.testing.assert_array_equal(running[0], np.zeros(64))
    np.testing.assert_array_equal(adapted[0], np.arange(64) % 2 == 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_source_requests_refused_by_target_and_vice_versa(digits_cache):
    content = RecordDict(
        {ARRAYS: to_record(weights()), CONFIG: ConfigRecord(silo_config(digits_cache, **TARGET))}
    )
    reply = call("query.embed", ("mnist", "source"), content)
    assert reply.has_error() and "only the target silo does" in reply.error.reason
    reply = call("train.vote", ("mnistm", "target"), content)
    assert reply.has_error() and "no source models" in reply.error.reason


# Source alignment and optimizer state -------------------------------------------------------
def test_source_aligns_to_embeddings_and_keeps_optimizer_state(digits_cache):
    embeddings = np.random.default_rng(0).normal(size=(64, 800)).astype(np.float32)
    context = make_context(5, {"domain": "mnist", "role": "source"})
    steps = []
    for rnd in (1, 2):
        cfg = silo_config(digits_cache, **{"server-round": rnd, "mmd-weight": 0.5})
        content = RecordDict(
            {
                ARRAYS: to_record(weights()),
                EMBEDDINGS: to_record({EMBEDDINGS: embeddings}),
                CONFIG: ConfigRecord(cfg),
            }
        )
        reply = call("train", ("mnist", "source"), content, context)
        assert reply.content[METRICS]["mmd"] > 0
        state = from_record(context.state["optimizer"])
        steps.append(float(state["0.step"].item()))
    assert steps == [15.0, 30.0]  # Adam's step count carries over to round 2


# The strategy ------------------------------------------------------------------------------
def node_configs(cache, nodes=NODES) -> dict[int, dict]:
    return {nid: {"domain": d, "role": r, "data-dir": str(cache)} for nid, (d, r) in nodes.items()}


def fedka_settings(**changes) -> FedKASettings:
    """What these tests run FedKA with: a small target round, the fine-tuned start, MK-MMD
    weight 1 and no disentangler, with ``changes`` applied."""
    settings = FedKASettings(
        start_from="finetuned",
        mmd_weight=1.0,
        disentangle=DisentangleSettings(enabled=False),
        vote_target_stats=False,
        embed_samples=TARGET["embed-samples"],
        vote_samples=TARGET["vote-samples"],
        finetune_steps=TARGET["finetune-steps"],
    )
    return dataclasses.replace(settings, **changes)


def run_fedka(tmp_path, grid, rounds=2, taps=(), **kwargs):
    cfg = compose(["data.domains=[mnist,usps,mnistm]"])
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    metered = MeteredGrid(grid, taps=list(taps))
    roster = discover_silos(metered, silos(cfg), timeout=10, data_config={})
    strategy = assemble(FedKA, fedka_settings(**kwargs), roster, recorder, rounds)
    train_cfg = silo_config(grid.nodes[11]["data-dir"])
    strategy.start(
        grid=metered,
        initial_arrays=to_record(weights()),
        num_rounds=rounds,
        timeout=60,
        train_config=to_config(train_cfg),
        evaluate_config=to_config(train_cfg),
    )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return strategy, [json.loads(line) for line in lines]


def test_fedka_rounds_record_alignment_and_vote_diagnostics(tmp_path, digits_cache):
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    strategy, lines = run_fedka(tmp_path, grid)
    assert [line["round"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        for key in ("mmd", "vote_agreement", "vote_kept_fraction", "pseudo_label_accuracy"):
            assert isinstance(line[key], float), key
        assert line["group_effect"] == pytest.approx(
            line["averaged_target_accuracy"]
            - np.mean(
                [line["silos"]["mnistm"][f"model-{d}-test-accuracy"] for d in ("mnist", "usps")]
            )
        )
        assert set(line["silos"]) == {"mnist", "usps", "mnistm"}
    assert lines[0]["target_accuracy"] is not None and "mmd" not in lines[0]
    final = {k: a.numpy() for k, a in strategy.final_arrays.items()}
    assert lines[-1]["target_accuracy"] == lines[-1]["silos"]["mnistm"]["test-accuracy"]
    assert set(final) == set(weights())


@pytest.mark.parametrize("start_from", ["finetuned", "averaged"])
def test_next_round_starts_from_the_configured_model(tmp_path, digits_cache, start_from):
    sent: dict[str, list] = {"train": [], "train.vote": []}

    def tap(direction, message, size):
        kind = message.metadata.message_type
        if direction == "sent" and kind in sent:
            sent[kind].append(from_record(message.content[ARRAYS]))

    def keep_replies(direction, message, size):
        if direction == "received" and message.metadata.message_type == "train.vote":
            sent.setdefault("tuned", []).append(from_record(message.content[ARRAYS]))

    grid = InProcessGrid(client_app, node_configs(digits_cache))
    run_fedka(tmp_path, grid, taps=(tap, keep_replies), start_from=start_from)
    round2 = sent["train"][-1]  # what a source received in round 2
    expected = sent["tuned"][0] if start_from == "finetuned" else sent["train.vote"][0]
    assert all(np.array_equal(round2[k], expected[k]) for k in expected)


def test_fedvote_sends_no_embeddings(tmp_path, digits_cache):
    seen = []
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    run_fedka(
        tmp_path,
        grid,
        rounds=1,
        taps=[lambda d, m, s: seen.extend(m.content.array_records) if m.has_content() else None],
        align=False,
    )
    assert EMBEDDINGS not in seen and source_model_key("mnist") in seen


def test_alignment_without_vote_only_embeds(tmp_path, digits_cache):
    kinds = []
    grid = InProcessGrid(client_app, node_configs(digits_cache))
    strategy, lines = run_fedka(
        tmp_path,
        grid,
        taps=[lambda d, m, s: kinds.append(m.metadata.message_type) if d == "sent" else None],
        vote=False,
    )
    assert "train.vote" not in kinds
    assert kinds.count("query.embed") == 3  # before round 1, then once per round
    assert all(isinstance(line["mmd"], float) for line in lines[1:])
    assert "vote_agreement" not in lines[-1]
    assert strategy.next_arrays is None  # nothing fine-tuned: rounds go on from the aggregate


def test_what_crosses_the_boundary_in_a_fedka_round(tmp_path, digits_cache):
    """Only model weights, target embeddings (M x 800) and scalar metrics/configs cross."""
    records: list[tuple[str, str, str, tuple]] = []

    def tap(direction, message, size):
        if not message.has_content():
            return
        for name, record in message.content.array_records.items():
            for array in record.values():
                records.append((direction, message.metadata.message_type, name, tuple(array.shape)))

    grid = InProcessGrid(client_app, node_configs(digits_cache))
    run_fedka(tmp_path, grid, rounds=1, taps=[tap])
    model_shapes = {tuple(a.shape) for a in weights().values()}
    kinds = {(d, t, n) for d, t, n, _ in records}
    assert kinds == {
        ("sent", "query.embed", "arrays"),
        ("received", "query.embed", "embeddings"),
        ("sent", "train", "arrays"),
        ("sent", "train", "embeddings"),
        ("received", "train", "arrays"),
        ("sent", "train.vote", "arrays"),
        ("sent", "train.vote", "model.mnist"),
        ("sent", "train.vote", "model.usps"),
        ("received", "train.vote", "arrays"),
        ("received", "train.vote", "embeddings"),
        ("sent", "evaluate", "arrays"),
    }
    for _, _, name, shape in records:
        if name == "embeddings":
            assert shape == (TARGET["embed-samples"], 800)
        else:
            assert shape in model_shapes, (name, shape)


# Bad input ----------------------------------------------------------------------------------
def test_fedka_needs_exactly_one_target(tmp_path):
    recorder = RunRecorder(tmp_path / "run", {"name": "t"}, target="mnistm")
    two = {1: Silo("mnist", "source"), 2: Silo("mnistm", "target"), 3: Silo("usps", "target")}
    with pytest.raises(FederationError, match=r"exactly one target silo .* found 2: mnistm, usps"):
        assemble(FedKA, FedKASettings(), two, recorder, 1)
    with pytest.raises(FederationError, match="found 0"):
        assemble(FedKA, FedKASettings(), {1: Silo("mnist", "source")}, recorder, 1)


def test_source_reply_without_records_is_dropped(tmp_path, digits_cache, caplog):
    def strip_usps(message, reply):
        if message.metadata.dst_node_id == 12 and message.metadata.message_type == "train":
            return Message(RecordDict({METRICS: reply.content[METRICS]}), reply_to=message)
        return reply

    grid = InProcessGrid(client_app, node_configs(digits_cache), intercept=strip_usps)
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        strategy, lines = run_fedka(tmp_path, grid, rounds=2)
    assert "dropped reply from usps: missing records" in caplog.text
    assert list(strategy.source_models) == ["mnist"]
    assert lines[-1]["vote_agreement"] == 1.0  # one voter agrees with itself


@pytest.mark.parametrize("failure", ["error", "empty"])
def test_target_failure_keeps_the_aggregate_and_the_run_goes_on(
    tmp_path, digits_cache, caplog, failure
):
    def break_vote(message, reply):
        if message.metadata.message_type != "train.vote":
            return reply
        if failure == "error":
            return Message(Error(100, "silo mnistm: out of memory"), reply_to=message)
        return Message(RecordDict({ARRAYS: reply.content[ARRAYS]}), reply_to=message)

    grid = InProcessGrid(client_app, node_configs(digits_cache), intercept=break_vote)
    with caplog.at_level("WARNING", logger="fedalign.strategy"):
        strategy, lines = run_fedka(tmp_path, grid, rounds=2)
    assert "no usable reply from the target silo" in caplog.text
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert strategy.final_arrays is strategy.round_aggregate
