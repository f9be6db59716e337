"""FedKA's disentangler and class-aware alignment across silos: what each one sends, keeps
and reports, and their configuration."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from client.app import app as client_app
from fedalign.config import ConfigError, compose, validate
from fedalign.protocol import (
    ARRAYS,
    CLASS_STATS,
    CONFIG,
    EMBEDDINGS,
    METRICS,
    from_record,
    source_model_key,
    to_record,
)
from fedalign.settings.fedka import ClassAlignSettings, DisentangleSettings, FedKASettings
from tests.conftest import InProcessGrid, make_context, silo_config
from tests.test_fedka import TARGET, call, node_configs, run_fedka, weights

# where a source keeps its discriminator in Context.state (client/adversary.py, kept_module.py)
WEIGHTS, OPTIMIZER, META = "discriminator", "discriminator-optimizer", "discriminator-meta"

pytestmark = pytest.mark.usefixtures("task_identity")


# The disentangler at a source ---------------------------------------------------------------
def _adversarial_train(cache, context, hidden: int = 100):
    embeddings = np.random.default_rng(0).normal(size=(64, 800)).astype(np.float32)
    cfg = silo_config(
        cache, **{"disentangle-weight": 0.5, "reversal-scale": 0.3, "disentangle-hidden": hidden}
    )
    content = RecordDict(
        {
            ARRAYS: to_record(weights()),
            EMBEDDINGS: to_record({EMBEDDINGS: embeddings}),
            CONFIG: ConfigRecord(cfg),
        }
    )
    return call("train", ("mnist", "source"), content, context)


def _discriminator_steps(context) -> float:
    return float(from_record(context.state[OPTIMIZER])["0.step"].item())


def test_source_discriminator_stays_in_the_silo_and_keeps_learning(digits_cache):
    context = make_context(5, {"domain": "mnist", "role": "source"})
    reply = _adversarial_train(digits_cache, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[METRICS]
    assert metrics["domain-loss"] > 0 and 0 <= metrics["domain-accuracy"] <= 1
    assert "mmd" not in metrics  # the disentangler alone: no MK-MMD term
    assert set(reply.content.array_records) == {ARRAYS}  # the discriminator never leaves
    model_keys = set(weights())
    assert set(from_record(reply.content[ARRAYS])) == model_keys
    assert dict(context.state[META]) == {"feature-dim": 800, "hidden": 100}
    first = from_record(context.state[WEIGHTS])
    assert _discriminator_steps(context) == 15.0

    _adversarial_train(digits_cache, context)
    assert _discriminator_steps(context) == 30.0  # round 2 went on from round 1's discriminator
    second = from_record(context.state[WEIGHTS])
    assert any(not np.array_equal(first[k], second[k]) for k in first)

    _adversarial_train(digits_cache, context, hidden=50)  # another shape: a fresh discriminator
    assert _discriminator_steps(context) == 15.0
    assert dict(context.state[META])["hidden"] == 50


# Class-aware alignment at the target ----------------------------------------------------------
def _vote(cache, start_from: str, finetune_steps: int):
    cfg = silo_config(
        cache,
        alpha=1.0,
        **{
            **TARGET,
            "finetune-steps": finetune_steps,
            "embed-samples": 0,
            "class-min-count": 4,
            "start-from": start_from,
        },
    )
    content = RecordDict({ARRAYS: to_record(weights()), CONFIG: ConfigRecord(cfg)})
    content[source_model_key("a")] = to_record(weights(1))
    content[source_model_key("b")] = to_record(weights(1))  # two voters that always agree
    reply = call("train.vote", ("mnistm", "target"), content)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


@pytest.mark.parametrize("start_from", ["averaged", "finetuned"])
def test_class_statistics_describe_the_model_the_sources_start_from(digits_cache, start_from):
    short, long = (_vote(digits_cache, start_from, steps) for steps in (2, 12))
    assert EMBEDDINGS not in short.content.array_records  # class statistics only
    stats = [from_record(reply.content[CLASS_STATS]) for reply in (short, long)]
    present = stats[0]["present"].astype(bool)
    assert stats[0]["means"].shape == (10, 800) and stats[0]["variance"].shape == (800,)
    assert short.content[METRICS]["class-stats-classes"] == present.sum() >= 1
    # From the averaged model the fine-tuning does not matter; from the fine-tuned model it does.
    same = np.allclose(stats[0]["means"][present], stats[1]["means"][present], atol=1e-5)
    assert same == (start_from == "averaged")


def test_class_statistics_are_left_out_when_class_alignment_is_off(digits_cache):
    cfg = silo_config(digits_cache, alpha=1.0, **{**TARGET, "embed-samples": 0})
    content = RecordDict({ARRAYS: to_record(weights()), CONFIG: ConfigRecord(cfg)})
    content[source_model_key("a")] = to_record(weights(1))
    reply = call("train.vote", ("mnistm", "target"), content)
    assert set(reply.content.array_records) == {ARRAYS}
    assert "class-stats-classes" not in reply.content[METRICS]


# The strategy ------------------------------------------------------------------------------
def test_class_alignment_alone_sends_class_statistics_and_no_embeddings(tmp_path, digits_cache):
    """Per class: C means (C x D), a pooled variance (D) and a C-long mask; no per-sample value."""
    crossed: list[tuple[str, str, int, str, tuple]] = []
    current = {"round": 0}

    def tap(direction, message, size):
        if message.has_content():
            if direction == "sent" and CONFIG in message.content:
                current["round"] = int(message.content[CONFIG].get("server-round", 0))
            rnd = current["round"]
            for name, record in message.content.array_records.items():
                for key, array in record.items():
                    crossed.append(
                        (direction, message.metadata.message_type, rnd, name, tuple(array.shape))
                    )
                    assert name != EMBEDDINGS, (direction, message.metadata.message_type)
                    assert key != "pseudo-labels"

    grid = InProcessGrid(client_app, node_configs(digits_cache))
    strategy, lines = run_fedka(
        tmp_path,
        grid,
        taps=[tap],
        align=False,
        class_align=ClassAlignSettings(enabled=True, weight=0.5, min_count=4),
    )
    stats = [(d, t, r, s) for d, t, r, n, s in crossed if n == CLASS_STATS]
    assert {(d, t, r) for d, t, r, _ in stats} == {
        ("received", "train.vote", 1),
        ("received", "train.vote", 2),
        ("sent", "train", 2),  # the first round has no statistics yet
    }
    assert sorted({s for *_, s in stats}) == [(10,), (10, 800), (800,)]
    assert lines[1]["class_stats_classes"] >= 1 and "class_align_loss" not in lines[1]
    assert isinstance(lines[2]["class_align_loss"], float)
    assert "mmd" not in lines[2] and "domain_loss" not in lines[2]
    groups = strategy.checkpoint_groups()
    assert set(groups["class-stats"]) == {"means", "variance", "present"}
    assert "embeddings" not in groups


def test_disentangler_alone_sends_embeddings_but_no_mmd_weight(tmp_path, digits_cache):
    configs = []

    def tap(direction, message, size):
        if direction == "sent" and message.metadata.message_type == "train":
            configs.append(dict(message.content[CONFIG]))

    grid = InProcessGrid(client_app, node_configs(digits_cache))
    _, lines = run_fedka(
        tmp_path,
        grid,
        taps=[tap],
        align=False,
        disentangle=DisentangleSettings(weight=0.2, schedule="constant"),
    )
    assert all(c["disentangle-weight"] == 0.2 and c["reversal-scale"] == 1.0 for c in configs)
    assert not any("mmd-weight" in c or "class-align-weight" in c for c in configs)
    for line in lines[1:]:
        assert isinstance(line["domain_loss"], float) and 0 <= line["domain_accuracy"] <= 1
        assert "mmd" not in line


# Configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.disentangle.schedule=ramp", r"strategy\.disentangle\.schedule"),
        ("strategy.disentangle.enabled=sometimes", r"strategy\.disentangle\.enabled='sometimes'"),
        ("strategy.class_align.weight=-1", r"strategy\.class_align\.weight"),
        ("strategy.class_align.min_count=1", r"strategy\.class_align\.min_count"),
    ],
)
def test_bad_block_settings_are_refused_before_anything_runs(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["strategy=fedka", override]))


def test_fedvote_turns_every_alignment_block_off():
    fedvote = FedKASettings.from_config(compose(["strategy=fedvote"]))
    assert fedvote.disentangle_weight == 0 and fedvote.class_align_weight == 0
    assert not fedvote.align and not fedvote.needs_embeddings
    assert FedKASettings.from_config(compose(["strategy=fedka"])).disentangle_weight > 0
