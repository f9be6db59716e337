"""The experiment harness: the smoke grid, resume, and the results table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedalign.config import ConfigError, compose
from fedalign.results import accuracy_table
from server.experiments import cell_overrides, cells, load_preset

FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.e2e
def test_smoke_grid_runs_resumes_and_tabulates(tmp_path, digits_cache):
    env_args = ["--root", str(tmp_path / "results"), "--docs", str(tmp_path / "docs")]
    first = subprocess.run(
        [FEDALIGN, "grid", "smoke", *env_args], capture_output=True, text=True, timeout=900
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "grid smoke: 4 run, 0 skipped, 0 failed" in first.stdout
    markdown = (tmp_path / "docs" / "results-smoke.md").read_text()
    table = table_rows(markdown, "| method | mnistm | usps | average |")
    assert table[0] == ["method", "mnistm", "usps", "average"]
    assert [row[0] for row in table[2:]] == ["fedavg", "fedka"]
    for row in table[2:]:
        values = [float(v) for v in row[1:]]
        assert all(0 <= v <= 100 for v in values)
        assert values[2] == pytest.approx((values[0] + values[1]) / 2, abs=0.051)
    assert "Cells complete: 4/4" in markdown and "2 rounds of 5 local steps" in markdown
    with (tmp_path / "docs" / "results-smoke.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"fedavg", "fedka"}
    assert (tmp_path / "docs" / "results-smoke.png").stat().st_size > 1000

    # An interrupted cell (no completed summary) is run again; finished ones are skipped.
    broken = tmp_path / "results" / "smoke" / "usps" / "fedavg" / "seed0" / "summary.json"
    broken.write_text(json.dumps({"status": "failed"}))
    kept = tmp_path / "results" / "smoke" / "mnistm" / "fedavg" / "seed0" / "summary.json"
    before = kept.stat().st_mtime_ns
    second = subprocess.run(  # one cell left: run in the grid's own process, no worker pool
        [FEDALIGN, "grid", "smoke", *env_args, "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "grid smoke: 1 run, 3 skipped, 0 failed" in second.stdout
    assert kept.stat().st_mtime_ns == before
    assert json.loads(broken.read_text())["status"] == "completed"


def test_presets_cover_the_grid():
    full = load_preset("full")
    assert len(cells(full)) == 5 * 19 * 3
    assert set(full["methods"]) == {
        "fedavg",
        "fedprox",
        "fedbn",
        "fisher",
        "fedvote",
        "fedvote_mmd",
        "fedvote_dis",
        "fedvote_class",
        "fedka",
        "fedka_class",
        "fedvote_mmd_fisher",
        "feddg_ga",
        "fedsr",
        *(
            f"oneshot_{merge}{init}"
            for merge in ("average", "fisher", "permuted")
            for init in ("", "_indep")
        ),
    }
    assert {"fedavg", "fedvote", "fedka", "fedka_class"} <= set(full["ablation"])
    adapted = {m for m, over in full["methods"].items() if "tta.methods=[lame,adabn]" in over}
    assert adapted == {"fedavg", "fedka", "feddg_ga", "fedsr"} | {
        m for m in full["methods"] if m.startswith("oneshot_")
    }
    assert len(cells(load_preset("smoke"))) == 2 * 2 * 1
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        load_preset("huge")


def test_per_target_overrides_reach_only_their_cells(tmp_path):
    full = load_preset("full")
    syn = compose(cell_overrides(full, "syn", "fedka", 0))
    usps = compose(cell_overrides(full, "usps", "fedka", 0))
    assert (syn.strategy.start_from, usps.strategy.start_from) == ("finetuned", "averaged")
    assert compose(cell_overrides(full, "syn", "fedvote", 0)).strategy.start_from == "averaged"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nengine: simulation\ntargets: [syn]\nmethods: {fedka: [strategy=fedka]}\n"
        "seeds: [0]\noverrides: []\nper_target: {syn: {fisher: [seed=1]}}\n"
    )
    with pytest.raises(ConfigError, match=r"per_target.syn names no target or method \['fisher'\]"):
        load_preset(str(bad))


def test_accuracy_table_means_and_averages():
    preset = {"targets": ["a", "b"], "methods": {"m": []}, "seeds": [0, 1]}
    rows = [
        {"method": "m", "target": "a", "seed": 0, "acc": 0.50},
        {"method": "m", "target": "a", "seed": 1, "acc": 0.70},
        {"method": "m", "target": "b", "seed": 0, "acc": 0.30},
        {"method": "m", "target": "b", "seed": 1, "acc": 0.10},
    ]
    table = accuracy_table(rows, preset, "acc").splitlines()
    assert table[2] == "| m | 60.0 ± 14.1 | 20.0 ± 14.1 | 40.0 ± 0.0 |"
    table = accuracy_table(rows[:3], preset, "acc").splitlines()  # seed 1 of b missing
    assert table[2] == "| m | 60.0 ± 14.1 | 30.0 | 40.0 |"


def test_a_cell_run_with_other_settings_is_stale(tmp_path):
    from omegaconf import OmegaConf

    from fedalign.results import is_complete
    from server.experiments import default_config, expected_config

    smoke = load_preset("smoke")
    defaults = default_config(smoke, "fedka")
    expected = expected_config(smoke, "usps", "fedka", 0)
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "summary.json").write_text(json.dumps({"status": "completed"}))

    def ran_with(config: dict) -> bool:
        (cell / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        return is_complete(cell, expected, defaults)

    same = json.loads(json.dumps(expected))
    same["federation"]["control_port"] += 1  # where it ran does not matter
    same["output"]["run_dir"] = "/elsewhere"
    assert ran_with(same)
    changed = json.loads(json.dumps(expected))
    changed["strategy"]["mmd_weight"] = expected["strategy"]["mmd_weight"] * 10
    assert not ran_with(changed)
    older = json.loads(json.dumps(expected))
    del older["updates"]  # a run from before the setting existed: its default then applies
    assert ran_with(older)
    assert is_complete(cell)  # without an expectation only the status counts


def test_a_block_that_is_off_compares_as_absent():
    from fedalign.results import same_settings

    defaults = {"strategy": {"mmd_weight": 1.0, "extra": {"enabled": True, "weight": 0.1}}}
    old = {"strategy": {"mmd_weight": 1.0}}  # ran before the block existed
    off = {"strategy": {"mmd_weight": 1.0, "extra": {"enabled": False, "weight": 0.5}}}
    on = {"strategy": {"mmd_weight": 1.0, "extra": {"enabled": True, "weight": 0.5}}}
    assert same_settings(old, off, defaults)
    assert same_settings(off, old, defaults)
    assert not same_settings(old, on, defaults)  # the block learns otherwise than its default
    assert not same_settings(off, on, defaults)


def test_expected_config_is_the_cell_composed_with_its_seed():
    """expected_config composes a target and method once for all seeds: it must equal composing
    each cell's own overrides."""
    from omegaconf import OmegaConf

    from server.experiments import expected_config

    full = load_preset("full")
    for target, method, seed in [("syn", "fedka", 2), ("syn", "fedka", 0), ("usps", "fedbn", 1)]:
        composed = compose(cell_overrides(full, target, method, seed))
        assert expected_config(full, target, method, seed) == OmegaConf.to_container(
            composed, resolve=True
        )


@pytest.mark.parametrize(
    "name", ["full", "fedka-val-syn", "fedka-val-svhn", "methods-val-syn", "methods-val-svhn"]
)
def test_every_committed_run_record_is_current(name):
    """A committed cell that a preset would run again is a results table out of date."""
    from fedalign.results import cell_dir, is_complete
    from server.experiments import default_config, expected_config

    preset = load_preset(name)
    root = Path(__file__).resolve().parents[1] / "results"
    defaults = {method: default_config(preset, method) for method in preset["methods"]}
    stale = []
    for target, method, seed in cells(preset):
        path = cell_dir(root, name, target, method, seed)
        if is_complete(path) and not is_complete(
            path, expected_config(preset, target, method, seed), defaults[method]
        ):
            stale.append(f"{target}/{method}/seed{seed}")
    assert not stale


def test_ablation_table_averages_targets_and_reports_group_effect_and_cost():
    from fedalign.results import ablation_table

    preset = {"targets": ["a", "b"], "seeds": [0, 1], "ablation": {"v": "vote", "f": "none"}}

    def row(method, target, seed, acc, effect):
        return {
            "method": method,
            "target": target,
            "seed": seed,
            "last5_accuracy": acc,
            "group_effect": effect,
            "seconds_per_round": 2.0 + seed,
            "mb_sent_per_round": 1.0,
            "mb_received_per_round": 0.5,
            "engine": "simulation" if seed == 0 else "in-process, 2 at once",
        }

    rows = [
        row("v", "a", 0, 0.8, 0.02),
        row("v", "b", 0, 0.6, 0.04),
        row("v", "a", 1, 0.9, 0.06),
        row("v", "b", 1, 0.7, 0.08),
        row("f", "a", 0, 0.5, None),  # seed 0 of b and all of seed 1 missing
        {"method": "f + LAME", "target": "a", "seed": 0, "last5_accuracy": 0.6},
    ]
    table = ablation_table(rows, preset).splitlines()
    # seconds are averaged within an engine only: seed 1's cells ran in-process
    assert table[2] == (
        "| v | vote | 75.0 ± 7.1 | +5.0 | 3.0 (in-process, 2 at once); 2.0 (simulation) | 1.50 |"
    )
    # the target's test-time adaptation is inside the rounds' seconds
    assert table[3] == "| f | none | — | — | 2.0 (simulation, with TTA) | 1.50 |"


def test_goal_lines_compare_averages_over_targets_and_say_met_or_not():
    from fedalign.results import goal_lines

    preset = {"targets": ["a", "b"], "seeds": [0, 1], "goals": {"k": {"v": 1.5, "f": 8.8}}}
    acc = {("k", 0): 0.86, ("k", 1): 0.84, ("v", 0): 0.85, ("v", 1): 0.84}  # per seed, per target
    rows = [
        {"method": m, "seed": seed, "target": t, "last5_accuracy": value}
        for (m, seed), value in acc.items()
        for t in ("a", "b")
    ]
    rows.append({"method": "f", "seed": 0, "target": "a", "last5_accuracy": 0.7})  # b missing
    assert goal_lines(rows, preset).splitlines() == [
        "- k over v: +0.5 points; goal +1.5: **not met**",
        "- k over f: goal +8.8 points; not measured yet",
    ]
    rows += [{"method": "f", "seed": 0, "target": "b", "last5_accuracy": 0.7}]
    assert goal_lines(rows, preset).splitlines()[1] == "- k over f: +15.0 points; goal +8.8: met"


def test_a_preset_ablation_must_name_its_methods(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\nengine: simulation\ntargets: [usps]\nmethods: {a: []}\nseeds: [0]\n"
        "overrides: []\nablation: {b: vote}\n"
    )
    with pytest.raises(ConfigError, match=r"ablation names methods the preset lacks: \['b'\]"):
        load_preset(str(path))
    path.write_text(path.read_text().replace("ablation: {b: vote}", "goals: {a: {c: 1.5}}"))
    with pytest.raises(ConfigError, match=r"goals name methods the preset lacks: \['c'\]"):
        load_preset(str(path))


def test_cost_table_ignores_columns_a_method_does_not_have():
    from fedalign.results import cost_table

    row = {
        "method": "fedavg",
        "wall_seconds": 90.0,
        "mb_sent_per_round": 3.0,
        "mb_received_per_round": 2.0,
        "seconds_per_round": None,
        "group_effect": None,  # FedAvg has no vote, so no Group Effect
    }
    table = cost_table([row], {"methods": {"fedavg": []}}).splitlines()
    assert table[2] == "| fedavg | 1 | 90 | 3.00 | 2.00 |"


def test_several_workers_apply_to_in_process_cells_only(tmp_path):
    from server.experiments import default_workers, run_grid

    simulation = {**load_preset("smoke"), "engine": "simulation"}
    assert default_workers(simulation) == 1
    assert default_workers(load_preset("smoke")) >= 1
    with pytest.raises(ConfigError, match="more than one applies to engine in-process only"):
        run_grid(simulation, tmp_path, workers=2)
    with pytest.raises(ConfigError, match="--workers 0"):
        run_grid(load_preset("smoke"), tmp_path, workers=0)
