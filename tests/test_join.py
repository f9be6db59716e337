"""A site joins a running federation with its own data, in one command (`fedalign silo join`):
an ImageFolder silo (TLS + SuperNode authentication, which refuses a plaintext SuperNode and
one whose key was never registered) and a .npz feature silo."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedalign.config import compose, validate
from server.certs import make_certificates
from server.launcher import launch
from server.processes import ManagedProcess, ProcessSet, free_port, scripts_first_on_path
from server.submit import flower_bin
from tests.conftest import free_ports, port_overrides
from tests.test_sites import image_tree

FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def join_when_asked(
    procs: ProcessSet, argv: list[str], log: Path, strangers: dict[str, list[str]]
) -> Callable[[str], None]:
    """An echo for the launcher: when it says the external silo may join (after the keys are
    registered and the SuperLink is up), start `fedalign silo join` as its own process, and the
    ``strangers`` (name: argv) beside it."""

    def echo(line: str) -> None:
        if "joins from elsewhere" in line and not procs.processes:
            procs.start("join", [FEDALIGN, "silo", "join", *argv], log)
            for name, stranger in strangers.items():
                procs.start(name, stranger, log.with_name(f"{name}.log"))

    return echo


def run_with_joiner(
    cfg_overrides: list[str],
    join_args: list[str],
    tmp_path: Path,
    strangers: Callable[[str], dict[str, list[str]]] = lambda fleet: {},
    after: Callable[[dict[str, ManagedProcess]], None] = lambda started: None,
) -> dict:
    """Launch the federation of ``cfg_overrides`` here while a site joins it with
    ``join_args``; ``strangers(fleet)`` are more processes started beside the site, handed to
    ``after`` once the run is over (before they are stopped). Returns the run's summary."""
    cfg = compose(cfg_overrides)
    validate(cfg)
    ports = port_overrides(len(cfg.data.domains))
    for item in ports:
        key, value = item.split("=")
        cfg.federation[key.split(".")[1]] = int(value)
    fleet = f"127.0.0.1:{cfg.federation.fleet_port}"
    procs = ProcessSet(env=scripts_first_on_path(os.environ))
    argv = ["--superlink", fleet, "--port", str(free_port()), *join_args]
    echo = join_when_asked(procs, argv, tmp_path / "j.log", strangers(fleet))
    try:
        summary = launch(cfg, tmp_path / "run", echo=echo)
        after({p.name: p for p in procs.processes})
    finally:
        assert procs.stop() == []
    joined = (tmp_path / "j.log").read_text()
    assert "What leaves this silo" in joined and "command: flower-supernode" in joined
    return summary


@pytest.mark.e2e
def test_an_image_folder_site_joins_with_tls_and_its_key_and_strangers_are_refused(
    tmp_path, digits_cache
):
    """A site joins a TLS federation with SuperNode authentication. Beside it, a plaintext
    SuperNode and one whose key the SuperLink never registered knock, and are refused."""
    site = image_tree(tmp_path / "hospital", digits_cache, per_class=12)
    certs = tmp_path / "certs"
    make_certificates(certs, ["hospital", "mnistm"])
    make_certificates(tmp_path / "other", ["intruder"])  # a key the SuperLink never registered
    intruder_key = tmp_path / "other" / "silos" / "intruder"
    node_config = 'domain="hospital" role="source"'

    def strangers(fleet: str) -> dict[str, list[str]]:
        plain_port, intruder_port = free_ports(2)
        return {
            "plaintext": [flower_bin("flower-supernode"), "--insecure", "--superlink", fleet,
                          "--node-config", node_config, "--port", str(plain_port)],
            "intruder": [flower_bin("flower-supernode"),
                         "--root-certificates", str(certs / "ca.crt"),
                         "--auth-supernode-private-key", str(intruder_key),
                         "--superlink", fleet, "--node-config", node_config,
                         "--port", str(intruder_port)],
        }  # fmt: skip

    def refused(started: dict[str, ManagedProcess]) -> None:
        intruder, plaintext = started["intruder"], started["plaintext"]
        assert intruder.popen.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in intruder.log_path.read_text()
        assert plaintext.exited() is None  # still knocking, never let in
        assert "Connection attempt failed" in plaintext.log_path.read_text()

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
        strangers,
        refused,
    )
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    assert sorted(summary["silos"].values()) == ["hospital", "mnistm"]  # the registered silos
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
