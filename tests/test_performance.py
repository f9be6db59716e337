"""What issue #9 added: sharded silos for scale, Flower's stock round pattern as a reference,
float16 embeddings, the reply-poll schedule and executor polling, the throttled plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from client.silo import identify
from fedalign.config import ConfigError, compose, parse_shard, shard_name, silos, to_json, validate
from fedalign.data import DataError, DomainSplit
from fedalign.runlog import RunRecorder
from server.grid import MeteredGrid
from server.inprocess import make_context, run_in_process

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = ["data.domains=[mnist,usps,mnistm]", "data.target=mnistm", "wandb.mode=disabled"]


def split(n_train: int = 10) -> DomainSplit:
    return DomainSplit(
        name="d",
        x_train=np.arange(n_train * 4, dtype=np.uint8).reshape(n_train, 1, 2, 2),
        y_train=np.arange(n_train, dtype=np.int64) % 3,
        x_test=np.zeros((2, 1, 2, 2), np.uint8),
        y_test=np.zeros(2, np.int64),
        classes=("a", "b", "c"),
    )


def test_shards_partition_the_training_data_and_keep_the_test_split():
    data = split(10)
    parts = [data.shard(i, 3, seed=4) for i in range(3)]
    firsts = np.concatenate([p.x_train[:, 0, 0, 0] for p in parts])
    assert sorted(firsts.tolist()) == sorted(data.x_train[:, 0, 0, 0].tolist())  # disjoint, whole
    assert sorted(len(p.y_train) for p in parts) == [3, 3, 4]
    assert all(p.x_test is data.x_test for p in parts)
    assert parts[0].name == "d.0"
    assert np.array_equal(data.shard(1, 3, seed=4).x_train, parts[1].x_train)  # reproducible
    with pytest.raises(DataError, match="too few for 11 shards"):
        data.shard(0, 11)


def test_sharded_silos_are_named_and_validated():
    cfg = compose([*SMALL, "data.shards=2"])
    validate(cfg)
    assert [(s.domain, s.role) for s in silos(cfg)] == [
        ("mnist.0", "source"),
        ("mnist.1", "source"),
        ("usps.0", "source"),
        ("usps.1", "source"),
        ("mnistm", "target"),
    ]
    assert parse_shard(shard_name("mnist", 7)) == ("mnist", 7)
    assert parse_shard("mnistm") == ("mnistm", None)
    for overrides, expected in [
        (["data.shards=0"], "data.shards must be >= 1"),
        (["data.shards=2", "strategy.min_sources=5"], "only 4 source silos"),
        (["federation.reply_poll_min=0.5", "federation.reply_poll_max=0.1"], "reply_poll_max"),
        (["federation.superexec_poll=100"], "superexec_poll=100.0 must be in [0.01, 60]"),
        (["strategy=fedka", "strategy.embed_transport=int8"], "embed_transport='int8'"),
    ]:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(".", r"\.")):
            validate(compose([*SMALL, *overrides]))


def test_a_simulated_partition_is_a_shard_silo():
    cfg = compose([*SMALL, "data.shards=2"])
    run_config = {"config-json": to_json(cfg)}
    identities = [identify(make_context(i, {"partition-id": i}, run_config)) for i in range(5)]
    assert [s.domain for s in identities] == [s.domain for s in silos(cfg)]
    with pytest.raises(ConfigError, match="the run has 5 silos"):
        identify(make_context(9, {"partition-id": 5}, run_config))


def run(tmp_path, digits_cache, name: str, overrides: list[str]) -> tuple[list[dict], dict]:
    cfg = compose(
        [*SMALL, f"data.cache_dir={digits_cache}", "train.local_steps=3", "rounds=2", *overrides]
    )
    validate(cfg)
    summary = run_in_process(cfg, tmp_path / name, threads=1)
    lines = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    weights = dict(np.load(tmp_path / name / "final_weights.npz"))
    return lines, {"summary": summary, "weights": weights}


def test_sharded_federation_trains_every_shard_on_its_part(tmp_path, digits_cache):
    lines, out = run(tmp_path, digits_cache, "sharded", ["data.shards=2"])
    assert out["summary"]["status"] == "completed"
    trained = {d: m["num-examples"] for d, m in lines[1]["silos"].items() if "num-examples" in m}
    assert set(trained) == {"mnist.0", "mnist.1", "usps.0", "usps.1"}
    whole, _ = run(tmp_path, digits_cache, "whole", ["rounds=1"])
    for domain in ("mnist", "usps"):
        assert (
            trained[f"{domain}.0"] + trained[f"{domain}.1"]
            == whole[1]["silos"][domain]["num-examples"]
        )
        assert abs(trained[f"{domain}.0"] - trained[f"{domain}.1"]) <= 1


def test_stock_pattern_learns_exactly_as_fedavg_with_one_more_phase(tmp_path, digits_cache):
    folded, a = run(tmp_path, digits_cache, "folded", ["strategy=fedavg"])
    stock, b = run(tmp_path, digits_cache, "stock", ["strategy=fedavg_stock"])
    assert a["weights"].keys() == b["weights"].keys()
    assert all(np.array_equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for rnd in (1, 2):  # the target evaluated the same model, in the round's own second phase
        assert stock[rnd]["target_accuracy"] == folded[rnd]["target_accuracy"]
    assert stock[0]["target_accuracy"] is None  # the stock pattern never evaluates round 0


def test_float16_embeddings_halve_their_bytes_and_still_align(tmp_path, digits_cache):
    fedka = ["strategy=fedka", "strategy.vote_samples=64", "strategy.finetune_steps=2"]
    full, _ = run(tmp_path, digits_cache, "f32", fedka)
    half, b = run(tmp_path, digits_cache, "f16", [*fedka, "strategy.embed_transport=float16"])
    embeddings = 512 * 800  # M x D of the digit CNN
    saved = (full[1]["bytes_sent"] + full[1]["bytes_received"]) - (
        half[1]["bytes_sent"] + half[1]["bytes_received"]
    )
    # the target sends them once and the server forwards them to each of the 2 sources
    assert saved == pytest.approx(3 * embeddings * 2, rel=0.01)
    assert b["summary"]["status"] == "completed"
    assert np.isfinite(half[1]["mmd"]) and half[1]["mmd"] == pytest.approx(full[1]["mmd"], rel=0.05)


class CountingGrid:
    """An inner grid whose replies arrive after ``ready`` pulls."""

    def __init__(self, ready: int) -> None:
        self.ready, self.pulls, self.sent = ready, 0, {}

    def push_messages(self, messages):
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = str(i)
            self.sent[str(i)] = message
        return list(self.sent)

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.ready:
            return []
        return [Message(RecordDict(), reply_to=self.sent[i]) for i in ids]


def test_replies_are_pulled_on_a_doubling_schedule_up_to_poll_max(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("server.grid.time.sleep", waits.append)
    grid = MeteredGrid(CountingGrid(ready=6), poll_min=0.05, poll_max=0.25)  # type: ignore[arg-type]
    replies = grid.send_and_receive([Message(RecordDict(), 5, "train")])
    assert len(list(replies)) == 1
    assert waits == [0.05, 0.1, 0.2, 0.25, 0.25]
    waits.clear()
    flower = MeteredGrid(CountingGrid(ready=3), poll_min=3, poll_max=3)  # type: ignore[arg-type]
    flower.send_and_receive([Message(RecordDict(), 5, "train")])
    assert waits == [3, 3]


def test_executor_poll_interval_reaches_flower_processes(tmp_path):
    from server.launcher import SUPEREXEC_POLL_ENV, LocalFederation

    fast = compose([*SMALL, "federation.superexec_poll=0.1"])
    with LocalFederation(fast, tmp_path) as federation:
        assert federation.procs.env[SUPEREXEC_POLL_ENV] == "0.1"
    with LocalFederation(compose(SMALL), tmp_path) as federation:  # default: Flower's own
        assert SUPEREXEC_POLL_ENV not in federation.procs.env


def test_plot_log_and_table_summarise_many_silos(tmp_path, caplog, monkeypatch):
    from rich.console import Console

    from cli.round_table import print_results
    from fedalign import runlog

    clock = [0.0]  # the recorder's clock: rounds 10 s apart, without waiting for them
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: clock[0])
    recorder = RunRecorder(tmp_path, {"name": "t"}, target="t")
    plot = tmp_path / "accuracy.png"
    drawn = []
    with caplog.at_level("INFO", logger="fedalign"):
        for rnd in range(4):
            clock[0] = 10.0 * rnd
            for i in range(30):
                recorder.silo(rnd, f"s.{i}", {"test-accuracy": 0.1 * rnd + i / 300})
            recorder.silo(rnd, "t", {"test-accuracy": 0.2 * rnd})
            recorder.complete(rnd)
            drawn.append(plot.exists())
    assert drawn == [False, False, False, True]  # redrawn once 30 s have passed, not per round
    assert "30 sources: mean 0.248, range 0.200-0.297" in caplog.text  # round 2
    assert "s.1 " not in caplog.text
    plot.unlink()
    recorder.finish("completed")
    assert plot.stat().st_size > 1000  # and at the end
    console = Console(record=True, width=200)
    print_results(tmp_path, console)
    table = console.export_text()
    assert "mean of 30 sources" in table and "s.1" not in table
    assert "24.8" in table  # round 2's mean, in percent


class SlowGrid:
    """An inner grid that answers each message on the second pull after its push."""

    def __init__(self) -> None:
        self.sent: dict[str, Message] = {}
        self.pulls: dict[str, int] = {}
        self.most_in_flight = 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            key = str(len(self.sent))
            message.metadata.__dict__["_message_id"] = key
            self.sent[key], self.pulls[key] = message, 0
            ids.append(key)
        self.most_in_flight = max(self.most_in_flight, len(self.pulls))
        return ids

    def pull_messages(self, ids):
        ready = []
        for key in ids:
            self.pulls[key] += 1
            if self.pulls[key] >= 2:
                ready.append(Message(RecordDict(), reply_to=self.sent[key]))
                del self.pulls[key]
        return ready


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_max_in_flight_bounds_the_silos_working_at_once(monkeypatch, limit):
    monkeypatch.setattr("server.grid.time.sleep", lambda _: None)
    inner = SlowGrid()
    grid = MeteredGrid(inner, max_in_flight=limit)  # type: ignore[arg-type]
    messages = [Message(RecordDict(), node, "train") for node in range(1, 8)]
    replies = list(grid.send_and_receive(messages))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(inner.sent)
    assert len(replies) == 7
    assert inner.most_in_flight == (7 if limit == 0 else limit)


def test_replies_say_how_long_the_silo_worked_and_started(monkeypatch, digits_cache):
    from flwr.app import ConfigRecord

    from client import runtime
    from client.app import app as client_app
    from tests.conftest import silo_config

    monkeypatch.setattr(runtime, "_FIRST_MESSAGE", [True])  # as in a fresh ClientApp process
    context = make_context(7, {"domain": "usps", "role": "source"})
    content = RecordDict({"config": ConfigRecord(silo_config(digits_cache))})
    first = client_app(Message(content, 7, "query.info"), context).content["metrics"]
    second = client_app(Message(content, 7, "query.info"), context).content["metrics"]
    assert first["handler-seconds"] > 0 and second["handler-seconds"] > 0
    assert first["start-seconds"] > 0 and first["import-seconds"] >= 0  # the process's age
    assert "start-seconds" not in second and "import-seconds" not in second
