"""FedDG-GA: the weight update and its step-size schedule against hand-worked numbers and a
plain-loop reference, and ``strategy=feddg_ga`` on the in-process grid (its averages, its
metrics, its exact resume)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from client.app import app as client_app
from fedalign import checkpoint
from fedalign.checkpoint import CHECKPOINT, load_resume
from fedalign.config import compose, validate
from fedalign.generalization import adjust_weights, generalization_gap, step_size, weights_of
from fedalign.protocol import ARRAYS, CONFIG, METRICS, TRAINED_LOSS, from_record
from fedalign.runlog import RunRecorder
from server.app import run
from strategies.feddg_ga import pack, unpack
from tests.conftest import InProcessGrid

SOURCES = ("a", "b", "c")


# The weight update ----------------------------------------------------------------------------
def test_three_sources_two_rounds_by_hand():
    # d = 0.3, R = 3: d_1 = 0.3, d_2 = 0.3 * (1 - 1/3) = 0.2; K = 3 sources.
    weights = dict.fromkeys(SOURCES, 1 / 3)
    # Round 1 gaps 0.5, 0.2, 0.2: mean 0.3, deviations 0.2, -0.1, -0.1, largest 0.2, so the
    # normalised deviations are 1, -0.5, -0.5; times d_1 / K = 0.1: +0.1, -0.05, -0.05.
    weights = adjust_weights(weights, {"a": 0.5, "b": 0.2, "c": 0.2}, step_size(0.3, 1, 3))
    assert weights == pytest.approx({"a": 13 / 30, "b": 8.5 / 30, "c": 8.5 / 30}, abs=1e-12)
    # Round 2 gaps 0.1, 0.4, 0.1: mean 0.2, deviations -0.1, 0.2, -0.1 -> -0.5, 1, -0.5; times
    # d_2 / K = 0.2 / 3: -1/30, +2/30, -1/30, giving 12/30, 10.5/30, 7.5/30.
    weights = adjust_weights(weights, {"a": 0.1, "b": 0.4, "c": 0.1}, step_size(0.3, 2, 3))
    assert weights == pytest.approx({"a": 0.4, "b": 0.35, "c": 0.25}, abs=1e-12)
    assert list(weights) == list(SOURCES)


def test_a_weight_below_zero_is_clipped_and_the_rest_renormalised():
    # Gaps 0, 1, 1: deviations -2/3, 1/3, 1/3 -> -1, 0.5, 0.5; d / K = 0.1: -0.1, +0.05, +0.05,
    # so 0.02 -> -0.08 -> 0 and 0.54, 0.54 renormalise to 0.5, 0.5.
    weights = adjust_weights({"a": 0.02, "b": 0.49, "c": 0.49}, {"a": 0, "b": 1, "c": 1}, 0.3)
    assert weights == pytest.approx({"a": 0.0, "b": 0.5, "c": 0.5}, abs=1e-12)


def test_equal_gaps_or_a_single_gap_leave_the_weights_unchanged():
    start = {"a": 0.5, "b": 0.3, "c": 0.2}
    # 0.1 three times: its float mean is not exactly 0.1, yet nothing may move.
    assert adjust_weights(start, dict.fromkeys(SOURCES, 0.1), 0.2) == start
    assert adjust_weights(start, {"b": 7.0}, 0.2) == start
    assert adjust_weights(start, {}, 0.2) == start


def test_a_source_missing_from_the_round_keeps_its_weight():
    # Only a and b measured a gap: 0 and 1, deviations -0.5, 0.5 -> -1, 1; d / K = 0.3 / 3 = 0.1
    # (K counts every source): a 0.4 -> 0.3, b 0.35 -> 0.45, c stays 0.25 (the sum is still 1).
    weights = adjust_weights({"a": 0.4, "b": 0.35, "c": 0.25}, {"a": 0.0, "b": 1.0}, 0.3)
    assert weights == pytest.approx({"a": 0.3, "b": 0.45, "c": 0.25}, abs=1e-12)
    with pytest.raises(ValueError, match="gaps of sources without a weight: d"):
        adjust_weights({"a": 1.0}, {"d": 0.1}, 0.3)


def reference_update(weights: dict, gaps: dict, step: float) -> dict:
    """The rule in plain Python loops, written from the method's description."""
    names = list(weights)
    new = dict(weights)
    measured = [n for n in names if n in gaps]
    mean = sum(gaps[n] for n in measured) / len(measured)
    largest = max(abs(gaps[n] - mean) for n in measured)
    for n in measured:
        new[n] += step / len(names) * (gaps[n] - mean) / largest
    for n in names:
        new[n] = min(max(new[n], 0.0), 1.0)
    total = sum(new.values())
    return {n: new[n] / total for n in names}


def test_random_updates_agree_with_plain_loops():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(2, 6)
        names = [f"s{i}" for i in range(k)]
        raw = [rng.random() for _ in names]
        weights = {n: r / sum(raw) for n, r in zip(names, raw, strict=True)}
        gaps = {n: rng.gauss(0, 1) for n in rng.sample(names, rng.randint(2, k))}
        step = rng.uniform(0, 1)
        assert adjust_weights(weights, gaps, step) == pytest.approx(
            reference_update(weights, gaps, step), abs=1e-12
        )


def test_the_schedule_decays_linearly_from_d_to_d_over_rounds():
    assert step_size(0.2, 1, 10) == 0.2
    assert step_size(0.2, 10, 10) == pytest.approx(0.02)
    steps = [step_size(0.2, r, 10) for r in range(1, 11)]
    assert np.diff(steps) == pytest.approx([-0.02] * 9)
    assert {step_size(0.2, r, 10, "constant") for r in range(1, 11)} == {0.2}
    for bad in (0, 11):
        with pytest.raises(ValueError, match=f"round {bad} is outside 1..10"):
            step_size(0.2, bad, 10)


def test_the_gap_is_how_much_worse_the_aggregate_does():
    assert generalization_gap(0.9, 0.4, "loss") == pytest.approx(0.5)
    assert generalization_gap(0.7, 0.8, "accuracy") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="metric 'f1'"):
        generalization_gap(0.7, 0.8, "f1")


def test_the_replying_silos_weights_are_renormalised_over_them():
    weights = {"a": 0.4, "b": 0.35, "c": 0.25}
    assert weights_of(weights, ["a", "c"]) == pytest.approx([0.4 / 0.65, 0.25 / 0.65])
    assert weights_of({"a": 1.0, "b": 0.0, "c": 0.0}, ["b", "c"]) == [0.5, 0.5]


def test_the_state_packs_into_arrays_and_back():
    weights, local = {"mnist.0": 0.6, "usps": 0.4}, {"mnist.0": 0.25}
    assert unpack(pack(weights, local)) == (weights, local)


# The strategy on the in-process grid ----------------------------------------------------------
ROLES = {11: ("mnist", "source"), 12: ("usps", "source"), 13: ("mnistm", "target")}


def federation(cache, tmp_path, *extra):
    run_dir = tmp_path / "run"
    cfg = compose(
        [
            "data.domains=[mnist,usps,mnistm]",
            "strategy=feddg_ga",
            "rounds=3",
            "train.local_steps=5",
            f"data.cache_dir={cache}",
            f"output.run_dir={run_dir}",
            "wandb.mode=disabled",
            *extra,
        ]
    )
    validate(cfg)
    nodes = {
        n: {"domain": d, "role": r, "data-dir": str(cache), "state-dir": str(tmp_path / "state")}
        for n, (d, r) in ROLES.items()
    }
    return cfg, nodes, run_dir


def lines_of(run_dir):
    return [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reply_node(message):
    return message.metadata.dst_node_id


@pytest.mark.usefixtures("task_identity")
def test_feddg_ga_averages_with_the_adjusted_weights(tmp_path, digits_cache):
    sent, replies = {}, {}  # (round, silo) -> the global model sent / the train reply

    def capture(message, reply):
        if message.metadata.message_type == "train":
            key = (int(message.content[CONFIG]["server-round"]), ROLES[reply_node(message)][0])
            sent[key] = from_record(message.content[ARRAYS])
            replies[key] = (from_record(reply.content[ARRAYS]), dict(reply.content[METRICS]))
        return reply

    cfg, nodes, run_dir = federation(digits_cache, tmp_path)
    run(
        InProcessGrid(client_app, nodes, intercept=capture), cfg, RunRecorder(run_dir, {}, "mnistm")
    )
    lines = lines_of(run_dir)
    with np.load(run_dir / "final_weights.npz") as data:
        final = {k: data[k] for k in data.files}
    aggregates = {1: sent[2, "mnist"], 2: sent[3, "mnist"], 3: final}

    # Uniform weights in round 1 (not the example counts 2000 and 1438), then each round
    # d_{r-1} / K = 0.2 * (1 - (r - 2) / 3) / 2 towards the source with the larger gap.
    expected = {"mnist": 0.5, "usps": 0.5}
    for rnd in (1, 2, 3):
        if rnd > 1:
            gaps = {
                silo: replies[rnd, silo][1]["received-test-loss"]
                - replies[rnd - 1, silo][1][TRAINED_LOSS]
                for silo in expected
            }
            worse = max(gaps, key=gaps.get)
            move = 0.2 * (1 - (rnd - 2) / 3) / 2
            expected = {s: w + (move if s == worse else -move) for s, w in expected.items()}
            assert lines[rnd]["ga_gaps"] == pytest.approx(gaps)
        assert lines[rnd]["ga_weights"] == pytest.approx(expected, abs=1e-12)
        for name, value in aggregates[rnd].items():
            direct = sum(
                w * replies[rnd, s][0][name].astype(np.float64) for s, w in expected.items()
            )
            np.testing.assert_allclose(value, direct, rtol=1e-5, atol=1e-6, err_msg=name)
    # The generalization gap's local side: the trained model on the same held-out test split.
    for _, metrics in replies.values():
        assert metrics[TRAINED_LOSS] > 0 and 0 <= metrics["trained-test-accuracy"] <= 1
        assert metrics[TRAINED_LOSS] != metrics["received-test-loss"]
    assert expected["mnist"] != expected["usps"]


@pytest.mark.usefixtures("task_identity")
def test_a_silo_missing_a_round_keeps_its_weight_and_the_run_goes_on(tmp_path, digits_cache):
    from flwr.app import Error, Message

    def drop_usps_in_round_2(message, reply):
        if (
            message.metadata.message_type == "train"
            and reply_node(message) == 12
            and message.content[CONFIG]["server-round"] == 2
        ):
            return Message(Error(100, "silo usps: offline"), reply_to=message)
        return reply

    cfg, nodes, run_dir = federation(digits_cache, tmp_path)
    grid = InProcessGrid(client_app, nodes, intercept=drop_usps_in_round_2)
    run(grid, cfg, RunRecorder(run_dir, {}, "mnistm"))
    lines = lines_of(run_dir)
    # Round 2: only mnist replied; one gap cannot deviate from its own mean, nothing moves.
    assert lines[2]["ga_gaps"].keys() == {"mnist"}
    assert lines[2]["ga_weights"] == {"mnist": 0.5, "usps": 0.5}
    # Round 3: usps has no local model of round 2, mnist's gap alone moves nothing either.
    assert lines[3]["ga_gaps"].keys() == {"mnist"}
    assert lines[3]["ga_weights"] == {"mnist": 0.5, "usps": 0.5}
    assert "usps" in lines[2]["dropped"]


@pytest.mark.usefixtures("task_identity")
def test_feddg_ga_resumed_after_round_2_ends_with_identical_weights(
    tmp_path, digits_cache, monkeypatch
):
    cfg, nodes, run_dir = federation(digits_cache, tmp_path)
    state_dir = tmp_path / "state"
    save = checkpoint.save

    def keep_round_2(path, state, groups):
        save(path, state, groups)
        if state["round"] == 2:
            shutil.copy(path, tmp_path / "round2.npz")
            shutil.copytree(state_dir, tmp_path / "state-round2")

    monkeypatch.setattr(checkpoint, "save", keep_round_2)
    run(InProcessGrid(client_app, nodes), cfg, RunRecorder(run_dir, {}, "mnistm"))
    with np.load(run_dir / "final_weights.npz") as data:
        uninterrupted = {k: data[k] for k in data.files}
    weights_3 = lines_of(run_dir)[3]["ga_weights"]

    shutil.copy(tmp_path / "round2.npz", run_dir / CHECKPOINT)
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.copytree(tmp_path / "state-round2", state_dir)
    cfg.resume = True
    resume = load_resume(cfg, run_dir)
    assert set(resume[1]["ga"]) == {"weight.mnist", "weight.usps", "local.mnist", "local.usps"}
    recorder = RunRecorder(run_dir, {}, "mnistm", state=resume[0]["recorder"])
    run(InProcessGrid(client_app, nodes), cfg, recorder, resume)
    with np.load(run_dir / "final_weights.npz") as data:
        for name, value in uninterrupted.items():
            assert np.array_equal(data[name], value), name
    assert recorder.lines[-1]["round"] == 3 and recorder.lines[-1]["ga_weights"] == weights_3
    assert weights_3 != {"mnist": 0.5, "usps": 0.5}
