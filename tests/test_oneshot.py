"""strategy=oneshot: its settings, the one exchange on the in-process grid, each merge and init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedalign.config import ConfigError, compose, validate
from fedalign.models import get_weights, seeded_model
from fedalign.permute import apply_permutation, permutation_spec
from fedalign.protocol import ARRAYS, FISHER, METRICS, to_record
from fedalign.results import cell_rows
from fedalign.settings.catalog import strategy_settings
from fedalign.settings.fisher import FisherSettings
from fedalign.settings.oneshot import INDEPENDENT_INIT, OneShotSettings
from server.inprocess import run_in_process
from strategies.fisher import FisherAggregator
from strategies.permuted_fisher import PermutedFisherAggregator

SMALL = ["data.domains=[mnist,usps,mnistm]", "wandb.mode=disabled"]


# Settings ------------------------------------------------------------------------------------
def test_conf_shows_the_settings_defaults():
    cfg = compose(["strategy=oneshot"])
    assert strategy_settings(cfg) == OneShotSettings()
    assert cfg.rounds == 1  # the preset makes the run one exchange
    assert OneShotSettings().local_steps == 10 * compose([]).train.local_steps


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds=10"], r"rounds=10: strategy=oneshot is one exchange \(rounds=1\)"),
        (["strategy.merge=median"], r"strategy\.merge='median' \(known: average, fisher"),
        (["strategy.init=zero"], r"strategy\.init='zero' \(known: shared, independent\)"),
        (["strategy.local_steps=0"], r"strategy\.local_steps must be >= 1"),
        (
            ["strategy.merge=fisher_permuted", "model=resnet18"],
            r"fisher_permuted matches the hidden units of digit_cnn, mlp only",
        ),
        (
            ["strategy.init=independent", "updates.max_norm=5.0"],
            r"updates\.max_norm is a distance from the model the server sent",
        ),
        (["strategy.merge=fisher", "updates.robust=median"], r"merges by Fisher"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose(["strategy=oneshot", *overrides]))
    assert "\n" not in str(info.value)


def test_the_wire_asks_for_local_steps_an_own_start_and_a_fisher():
    fisher = FisherSettings(samples=64)
    assert OneShotSettings(local_steps=7).to_wire() == {"local-steps": 7}
    wire = OneShotSettings(merge="fisher_permuted", init="independent", fisher=fisher).to_wire()
    assert wire == {"local-steps": 600, INDEPENDENT_INIT: True, **fisher.to_wire()}
    assert FisherSettings.from_wire(wire).samples == 64


def test_independent_starts_differ_by_silo_and_repeat_by_seed():
    seed = OneShotSettings.own_init_seed
    wire = {INDEPENDENT_INIT: True, "seed": 0}
    assert seed({"seed": 0}, "mnist") is None  # shared init: the sent model
    assert seed(wire, "mnist") == seed(dict(wire), "mnist")
    assert len({seed(wire, "mnist"), seed(wire, "usps"), seed({**wire, "seed": 1}, "mnist")}) == 3

    def start(silo, run_seed=0):
        return get_weights(seeded_model("digit_cnn", 10, 3, seed({**wire, "seed": run_seed}, silo)))

    state = torch.get_rng_state()
    mnist, again, usps = start("mnist"), start("mnist"), start("usps")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert all(np.array_equal(mnist[k], again[k]) for k in mnist)
    assert not np.allclose(mnist["encoder.0.weight"], usps["encoder.0.weight"])
    assert not np.allclose(mnist["encoder.0.weight"], start("mnist", 1)["encoder.0.weight"])


# The merge after matching ---------------------------------------------------------------------
def reply(weights, fisher, examples) -> Message:
    content = RecordDict(
        {
            ARRAYS: to_record(weights),
            METRICS: MetricRecord({"num-examples": examples}),
            FISHER: to_record(fisher),
        }
    )
    return Message(content, 1, "train")


@pytest.mark.usefixtures("task_identity")
def test_a_model_merged_with_its_permuted_copy_is_the_model(caplog):
    model = seeded_model("digit_cnn", 10, 3, 3)
    weights = get_weights(model)
    params = {n for n, _ in model.named_parameters()}
    rng = np.random.default_rng(0)
    fisher = {n: rng.random(weights[n].shape, np.float32) + 0.1 for n in params}
    spec = permutation_spec("digit_cnn", weights)
    perms = {n: rng.permutation(weights[a[0].tensor].shape[a[0].axis]) for n, a in spec.items()}
    copy = apply_permutation(spec, perms, weights)
    copy_fisher = apply_permutation(spec, perms, fisher)
    # The copy comes first by name, the model has the most examples: it is the reference.
    replies = [reply(copy, copy_fisher, 100), reply(weights, fisher, 300)]
    settings = FisherSettings(normalize=False)
    with caplog.at_level("INFO", logger="fedalign.strategy"):
        arrays, metrics = PermutedFisherAggregator(settings, params, "digit_cnn")(
            1, replies, ["a", "b"]
        )
    assert "a's hidden units matched to b's" in caplog.text
    assert metrics["fisher-silos"] == 2
    for name, values in weights.items():  # BatchNorm statistics included
        np.testing.assert_allclose(arrays[name].numpy(), values, rtol=1e-5, atol=1e-6)
    unmatched, _ = FisherAggregator(settings, params)(1, replies, ["a", "b"])
    assert not np.allclose(unmatched["encoder.0.weight"].numpy(), weights["encoder.0.weight"])


# The one exchange, in process ---------------------------------------------------------------
def run_oneshot(run_dir, cache, *overrides):
    cfg = compose(
        [
            "strategy=oneshot",
            *SMALL,
            f"data.cache_dir={cache}",
            "strategy.local_steps=5",
            "strategy.fisher.samples=32",
            *overrides,
        ]
    )
    validate(cfg)
    summary = run_in_process(cfg, run_dir, threads=1)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    boundary = [json.loads(x) for x in (run_dir / "boundary.jsonl").read_text().splitlines()]
    final = dict(np.load(run_dir / "final_weights.npz"))
    return summary, lines, boundary, final


@pytest.mark.parametrize("init", ["shared", "independent"])
@pytest.mark.parametrize("merge", ["average", "fisher", "fisher_permuted"])
def test_one_exchange_merges_once(tmp_path, digits_cache, caplog, merge, init):
    with caplog.at_level("INFO", logger="fedalign"):
        summary, lines, boundary, final = run_oneshot(
            tmp_path / "run", digits_cache, f"strategy.merge={merge}", f"strategy.init={init}"
        )
    assert [line["round"] for line in lines] == [0, 1]  # the initial model, the merge
    assert set(lines[1]["silos"]) == {"mnist", "usps", "mnistm"}
    assert lines[1]["silos"]["mnist"]["train-loss"] > 0
    initial = get_weights(seeded_model("digit_cnn", 10, 3, 0))  # the server's (server/app.py)
    assert not np.allclose(final["encoder.0.weight"], initial["encoder.0.weight"])
    # The headline of a one-round run is the merge's accuracy, round 0 left out.
    assert summary["rounds_completed"] == 1
    merged = lines[1]["target_accuracy"]
    assert summary["mean_last5_target_accuracy"] == summary["final_target_accuracy"] == merged
    (row,) = cell_rows(tmp_path / "run", "mnistm", "oneshot", 0)
    assert row["last5_accuracy"] == row["final_accuracy"] == merged and row["rounds"] == 1
    # What crossed: train once to each source (weights only with a shared init), one reply each.
    train_sent = [b for b in boundary if b["type"] == "train" and b["direction"] == "sent"]
    replies = [b for b in boundary if b["type"] == "train" and b["direction"] == "received"]
    assert sorted(b["silo"] for b in train_sent) == sorted(b["silo"] for b in replies)
    assert sorted(b["silo"] for b in replies) == ["mnist", "usps"]
    for sent in train_sent:
        assert set(sent["arrays"]) == ({"arrays"} if init == "shared" else set())
        assert (INDEPENDENT_INIT in sent["configs"]["config"]) == (init == "independent")
    for reply in replies:
        assert set(reply["arrays"]) == ({"arrays"} if merge == "average" else {"arrays", "fisher"})
    matched = "hidden units matched to" in caplog.text
    assert matched == (merge == "fisher_permuted")
    assert ("initialised its own model" in caplog.text) == (init == "independent")
    assert "trained 5 steps" in caplog.text  # strategy.local_steps, not train.local_steps


def test_independent_starts_repeat_with_the_seed(tmp_path, digits_cache):
    args = ("strategy.init=independent", "strategy.local_steps=2")
    *_, first = run_oneshot(tmp_path / "a", digits_cache, *args)
    *_, again = run_oneshot(tmp_path / "b", digits_cache, *args)
    *_, other = run_oneshot(tmp_path / "c", digits_cache, *args, "seed=1")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.allclose(first["encoder.0.weight"], other["encoder.0.weight"])
