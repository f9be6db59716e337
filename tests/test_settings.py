"""Each strategy's settings: defaults written once (conf/ agrees), validation, the wire."""

from __future__ import annotations

import dataclasses

import pytest

from fedalign.config import ConfigError, compose, validate
from fedalign.settings.catalog import SETTINGS, strategy_settings
from fedalign.settings.fedavg import FedAvgSettings
from fedalign.settings.fedbn import FedBNSettings
from fedalign.settings.feddg_ga import FedDGGASettings
from fedalign.settings.fedka import (
    ClassAlignSettings,
    DisentangleSettings,
    FedKASettings,
    SourceAlignment,
    TargetRound,
)
from fedalign.settings.fedprox import FedProxSettings
from fedalign.settings.fisher import FisherMergeSettings, FisherSettings
from fedalign.settings.oneshot import OneShotSettings
from fedalign.settings.updates import UpdateSettings
from strategies.registry import STRATEGIES

FEDKA = FedKASettings()


# Defaults: the dataclasses own them; conf/ shows the same values to the user -------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedavg", FedAvgSettings()),
        ("fedavg_stock", FedAvgSettings(name="fedavg_stock")),
        ("fedprox", FedProxSettings()),
        ("fedbn", FedBNSettings()),
        ("fisher", FisherMergeSettings()),
        ("feddg_ga", FedDGGASettings()),
        ("fedka", FEDKA),
        (
            "fedvote",
            dataclasses.replace(
                FEDKA, name="fedvote", align=False, disentangle=DisentangleSettings(enabled=False)
            ),
        ),
        ("fedka_fisher", dataclasses.replace(FEDKA, name="fedka_fisher", aggregation="fisher")),
        ("oneshot", OneShotSettings()),
    ],
)
def test_conf_shows_the_settings_defaults(name, expected):
    assert strategy_settings(compose([f"strategy={name}"])) == expected


def test_updates_defaults_match_conf():
    assert UpdateSettings.from_config(compose([]), merges_by_fisher=False) == UpdateSettings()


def test_every_strategy_name_has_settings_and_a_strategy():
    assert set(SETTINGS) == set(STRATEGIES)


# Validation: one line naming the key ----------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.name=fedx"], r"strategy\.name='fedx' \(known: fedavg, fedavg_stock"),
        (["strategy=fedprox", "strategy.proximal_mu=-1"], r"strategy\.proximal_mu must be >= 0"),
        (["strategy=fisher", "strategy.fisher.mode=guess"], r"strategy\.fisher\.mode='guess'"),
        (
            ["strategy=fisher", "strategy.fisher.floor=0"],
            r"strategy\.fisher\.floor must be >= 1e-30",
        ),
        (["strategy=fedka", "strategy.mmd_weight=-0.1"], r"strategy\.mmd_weight must be >= 0"),
        (["strategy=fedka", "strategy.min_agreement=2"], r"min_agreement=2.0 must be in \[0, 1\]"),
        (["strategy=fedka", "strategy.start_from=best"], r"strategy\.start_from='best'"),
        (["strategy=fisher", "updates.robust=median"], r"strategy fisher merges by Fisher"),
        (["strategy=feddg_ga", "strategy.step_size=1.5"], r"step_size=1.5 must be in \[0, 1\]"),
        (["strategy=feddg_ga", "strategy.step_schedule=cosine"], r"step_schedule='cosine'"),
        (["strategy=feddg_ga", "strategy.gap_metric=f1"], r"strategy\.gap_metric='f1'"),
        (["strategy=feddg_ga", "updates.robust=krum"], r"weights strategy feddg_ga adjusts"),
        (["train.optimizer=lion"], r"train\.optimizer='lion' \(known: adam, sgd\)"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose(overrides))
    assert "\n" not in str(info.value)


# The wire: what the server writes, the silo reads back ----------------------------------------
@pytest.mark.parametrize(
    "settings", [FedProxSettings(proximal_mu=0.5), FedBNSettings(), FedDGGASettings()]
)
def test_baseline_settings_survive_the_wire(settings):
    assert type(settings).from_wire(settings.to_wire()) == settings
    assert type(settings).from_wire({}) is None


def test_fisher_settings_survive_the_wire():
    sent = FisherSettings(mode="sampled", samples=64, floor=1e-3, transport="float16")
    received = FisherSettings.from_wire(sent.to_wire())
    assert (received.mode, received.samples, received.transport) == ("sampled", 64, "float16")
    assert received.floor == FisherSettings.floor  # the merge's settings stay on the server
    assert FisherSettings.from_wire({"proximal-mu": 0.1}) is None
    assert FisherMergeSettings(fisher=sent).to_wire() == sent.to_wire()
    assert dataclasses.replace(FEDKA, aggregation="fisher", fisher=sent).to_wire() == sent.to_wire()
    assert FEDKA.to_wire() == {}


def test_fedka_sends_its_sources_the_weights_of_the_round():
    settings = dataclasses.replace(
        FEDKA,
        mmd_weight=0.4,
        disentangle=DisentangleSettings(weight=0.2, schedule="constant", hidden=50),
        class_align=ClassAlignSettings(enabled=True, weight=0.3),
    )
    wire = settings.source_wire(alpha=0.5, embeddings=True, class_stats=True)
    assert list(wire) == [
        "mmd-weight",
        "kernel-mul",
        "kernel-num",
        "disentangle-weight",
        "reversal-scale",
        "disentangle-hidden",
        "class-align-weight",
    ]
    received = SourceAlignment.from_wire(wire)
    assert received == SourceAlignment(
        mmd_weight=0.2,  # mmd_weight * alpha
        disentangle_weight=0.2,
        reversal_scale=1.0,  # constant schedule
        disentangle_hidden=50,
        class_align_weight=0.15,
    )
    first_round = settings.source_wire(alpha=0.5, embeddings=False, class_stats=False)
    assert first_round == {} and SourceAlignment.from_wire(first_round) == SourceAlignment()


def test_fedka_tells_the_target_what_to_do():
    settings = dataclasses.replace(FEDKA, vote_samples=256, soft_vote=True, start_from="finetuned")
    wire = settings.target_wire(server_round=3, alpha=0.7)
    assert list(wire) == [  # the order the target's config has always had on the wire
        "embed-samples",
        "embed-transport",
        "vote-samples",
        "soft-vote",
        "min-agreement",
        "vote-target-stats",
        "finetune-steps",
        "kernel-mul",
        "kernel-num",
        "server-round",
        "alpha",
        "start-from",
        "class-min-count",
    ]
    received = TargetRound.from_wire(wire)
    for name in ("embed_samples", "vote_samples", "soft_vote", "finetune_steps", "start_from"):
        assert getattr(received, name) == getattr(settings, name), name
    assert received.alpha == 0.7 and received.class_min_count == 0  # class alignment is off
    fedvote = dataclasses.replace(FEDKA, align=False, disentangle=DisentangleSettings(False))
    assert TargetRound.from_wire(fedvote.target_wire(1, 0.1)).embed_samples == 0
