"""Faults injected for real into a running deployment: a source SuperNode SIGKILLed mid-round."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
from omegaconf import OmegaConf

from fedalign.config import compose, silos, validate
from server.launcher import LocalFederation
from server.processes import descendants
from tests.conftest import free_ports, port_overrides

pytestmark = pytest.mark.e2e


def kill_tree(pid: int) -> None:
    for child in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_source_killed_mid_round_is_dropped_and_rejoins(digits_cache, tmp_path):
    cfg = compose(
        [
            "data.domains=[mnist,usps,mnistm]",
            f"data.cache_dir={digits_cache}",
            "rounds=5",
            "train.local_steps=20",
            "wandb.mode=disabled",
            "federation.round_timeout=30",
            "federation.connect_timeout=60",
            *port_overrides(3),
        ]
    )
    validate(cfg)
    run_dir = tmp_path / "run"
    OmegaConf.update(cfg, "output.run_dir", str(run_dir), force_add=True)
    seen: list[str] = []
    events: dict[str, bool] = {}

    with LocalFederation(cfg, run_dir) as federation:

        def on_line(line: str) -> None:
            seen.append(line)
            if "round 2/5: training on" in line and "killed" not in events:
                silo = next(p for p in federation.procs.processes if p.name == "silo-usps")
                kill_tree(silo.popen.pid)  # the round's train message is on its way to usps
                events["killed"] = True
            elif "no reply from usps" in line and "restarted" not in events:
                index, silo = next((i, s) for i, s in enumerate(silos(cfg)) if s.domain == "usps")
                argv = federation.supernode_argv(index, silo)
                argv[argv.index("--port") + 1] = str(free_ports(1)[0])
                federation.procs.start("silo-usps-again", argv, run_dir / "logs" / "usps2.log")
                events["restarted"] = True

        federation.echo = on_line
        federation.start()
        status = federation.submit()

    assert status.startswith("finished:completed"), (status, seen[-10:])
    assert events == {"killed": True, "restarted": True}
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "usps" in rounds[2]["dropped"]  # recorded in the metrics of the round it missed
    assert "train-loss" not in rounds[2]["silos"].get("usps", {})
    back = [r["round"] for r in rounds if "train-loss" in r["silos"].get("usps", {})]
    assert back and min(back) == 1 and max(back) > 2, back  # trained before and after the kill
    assert "test-accuracy" in rounds[-1]["silos"]["usps"]  # and evaluated the final model
    assert any("silo usps rejoined on node" in line for line in seen)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 5
