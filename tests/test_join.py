"""A site joins a running federation with its own data, in one command (`fedalign silo join`):
an ImageFolder silo (TLS + SuperNode authentication) and a .npz feature silo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fedalign.config import compose, validate
from server.certs import make_certificates
from server.launcher import launch
from server.processes import ProcessSet, free_port
from tests.conftest import port_overrides
from tests.test_sites import image_tree

FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def join_when_asked(procs: ProcessSet, argv: list[str], log: Path):
    """An echo for the launcher: when it says the external silo may join (after the keys are
    registered and the SuperLink is up), start `fedalign silo join` as its own process."""

    def echo(line: str) -> None:
        if "joins from elsewhere" in line and not procs.processes:
            procs.start("join", [FEDALIGN, "silo", "join", *argv], log)

    return echo


def run_with_joiner(cfg_overrides: list[str], join_args: list[str], tmp_path: Path) -> dict:
    cfg = compose(cfg_overrides)
    validate(cfg)
    ports = port_overrides(len(cfg.data.domains))
    for item in ports:
        key, value = item.split("=")
        cfg.federation[key.split(".")[1]] = int(value)
    fleet = f"127.0.0.1:{cfg.federation.fleet_port}"
    procs = ProcessSet(env=dict(os.environ))
    argv = ["--superlink", fleet, "--port", str(free_port()), *join_args]
    try:
        summary = launch(
            cfg, tmp_path / "run", echo=join_when_asked(procs, argv, tmp_path / "j.log")
        )
    finally:
        assert procs.stop() == []
    joined = (tmp_path / "j.log").read_text()
    assert "What leaves this silo" in joined and "command: flower-supernode" in joined
    return summary


@pytest.mark.e2e
def test_an_image_folder_site_joins_with_tls_and_its_key(tmp_path, digits_cache):
    site = image_tree(tmp_path / "hospital", digits_cache, per_class=12)
    certs = tmp_path / "certs"
    make_certificates(certs, ["hospital", "mnistm"])
    summary = run_with_joiner(
        [
            "data.domains=[hospital,mnistm]",  # the site is the source; the target is hosted here
            f"data.cache_dir={digits_cache}",
            "federation.external_silos=[hospital]",
            "federation.tls=true",
            "federation.auth=true",
            f"federation.certs_dir={certs}",
            "rounds=1",
            "train.local_steps=10",
            "wandb.mode=disabled",
        ],
        [
            "--domain",
            "hospital",
            "--data",
            str(site),
            "--root-certificates",
            str(certs / "ca.crt"),
            "--key",
            str(certs / "silos" / "hospital"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        tmp_path,
    )
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "test-accuracy" in lines[-1]["silos"]["hospital"], "the site trained and evaluated"
    # the site's messages were handled by its warm runtime, which stopped with the SuperNode
    runtime_log = (tmp_path / "state" / "runtime" / "hospital.log").read_text()
    assert "silo runtime ready" in runtime_log and "handling train (round 1)" in runtime_log
    assert not (tmp_path / "state" / "runtime" / "hospital" / "runtime.sock").exists()


@pytest.mark.e2e
def test_a_feature_silo_joins_a_feature_shift_federation(tmp_path):
    from fedalign.data.feature_shift import write_feature_shift

    paths = write_feature_shift(tmp_path / "features")
    summary = run_with_joiner(
        [
            "data.source=npz",
            "data.domains=[clean,inverted,noisy]",
            "data.target=noisy",
            f"data.cache_dir={paths['all'].parent}",  # the two silos hosted here
            "federation.external_silos=[inverted]",
            "model=mlp",
            "model.in_channels=64",
            "rounds=2",
            "train.local_steps=30",
            "wandb.mode=disabled",
        ],
        ["--domain", "inverted", "--data", str(paths["inverted"].parent), "--insecure"],
        tmp_path,
    )
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    # Two short rounds of FedAvg over opposite-polarity sensors: well above the untrained model.
    assert summary["final_target_accuracy"] > summary["initial_target_accuracy"] + 0.1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "test-accuracy" in lines[-1]["silos"]["inverted"]
