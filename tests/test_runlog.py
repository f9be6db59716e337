"""The run record's summary and table: which silos did not evaluate the final model, and a
column for a silo that never reported."""

from __future__ import annotations

import json
import re

from omegaconf import OmegaConf
from rich.console import Console

from cli.round_table import print_results
from fedalign.config import compose
from fedalign.runlog import RunRecorder


def test_silos_not_finished_are_those_without_a_final_test_accuracy(tmp_path):
    cfg = compose(["data.domains=[mnist,usps,mnistm,syn]", "data.target=mnistm"])
    recorder = RunRecorder(tmp_path, OmegaConf.to_container(cfg, resolve=True), "mnistm")
    for domain in ("mnist", "usps", "mnistm"):  # syn never connected: in no line at all
        recorder.silo(0, domain, {"test-accuracy": 0.1})
    recorder.complete(0)
    recorder.silo(1, "mnistm", {"test-accuracy": 0.6})
    recorder.silo(1, "usps", {"test-accuracy": 0.5})  # dropped from training, then evaluated
    recorder.silo(1, "mnist", {"train-loss": 1.0})  # trained, left before evaluating the result
    recorder.metrics(1, dropped=["usps"], absent=["syn"])
    recorder.complete(1)
    summary = recorder.finish("completed")
    assert summary["silos_not_finished"] == ["mnist", "syn"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["silos_not_finished"] == ["mnist", "syn"]


def test_without_a_data_config_the_silos_seen_in_any_round_count(tmp_path):
    recorder = RunRecorder(tmp_path, {"name": "t"}, target="mnistm")
    recorder.silo(0, "usps", {"test-accuracy": 0.2})
    recorder.silo(0, "mnistm", {"test-accuracy": 0.2})
    recorder.complete(0)
    recorder.silo(1, "mnistm", {"test-accuracy": 0.4})
    recorder.complete(1)
    assert recorder.finish("completed")["silos_not_finished"] == ["usps"]


def test_a_silo_that_never_reported_has_a_column_in_the_table(tmp_path):
    """Killed before its first reply, usps is only in the dropped/absent lists of the rounds."""
    recorder = RunRecorder(tmp_path, {"name": "t"}, target="mnistm")
    for rnd in (0, 1, 2):
        recorder.silo(rnd, "mnistm", {"test-accuracy": 0.3})
        recorder.silo(rnd, "mnist", {"test-accuracy": 0.5})
        if rnd:
            recorder.metrics(rnd, **{"dropped" if rnd == 1 else "absent": ["usps"]})
        recorder.complete(rnd)
    recorder.finish("completed")
    console = Console(record=True, width=200)
    print_results(tmp_path, console)
    rows = [
        [c.strip() for c in re.split("[│┃]", r)[1:-1]] for r in console.export_text().splitlines()
    ]
    header = next(r for r in rows if r and r[0] == "round")
    cells = {r[0]: r[header.index("usps")] for r in rows if r and r[0] in ("0", "1", "2")}
    assert cells == {"0": "-", "1": "dropped", "2": "absent"}


class _Tracker:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


def test_the_tracker_gets_nested_round_metrics_under_outer_inner_names(tmp_path):
    tracker = _Tracker()
    recorder = RunRecorder(tmp_path, {"name": "t"}, target="mnistm", tracker=tracker)
    recorder.silo(1, "mnistm", {"test-accuracy": 0.4})
    recorder.silo(1, "usps", {"train-loss": 1.5})
    recorder.metrics(1, ga_weights={"usps": 0.6, "mnist": 0.4}, dropped=["syn"], mmd=0.2)
    recorder.complete(1)
    step, values = tracker.logged[0]
    assert step == 1
    assert values["ga_weights/usps"] == 0.6 and values["ga_weights/mnist"] == 0.4
    assert values["silo/mnistm/test-accuracy"] == 0.4 and values["silo/usps/train-loss"] == 1.5
    assert values["mmd"] == 0.2 and values["target_accuracy"] == 0.4
    assert "round" not in values and not any(k.startswith("dropped") for k in values)
