"""End to end: real flower-superlink / flower-supernode processes over gRPC on loopback.

Every federation started here carries a marker environment variable, inherited by every
process Flower spawns, so the tests can prove that nothing outlives a run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedalign.config import compose, validate
from server.launcher import LaunchError, LocalFederation, launch
from server.processes import carrying, pid_alive
from tests.conftest import free_ports, port_overrides

pytestmark = pytest.mark.e2e
TWO_SILOS = ("usps", "mnistm")  # where a test needs one source and the target, no more
FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def overrides(
    cache: Path,
    out: Path,
    *extra: str,
    simulation: bool = False,
    domains: tuple[str, ...] = ("mnist", "usps", "mnistm"),
) -> list[str]:
    ports = port_overrides(len(domains))
    return [
        f"data.domains=[{','.join(domains)}]",
        f"data.cache_dir={cache}",
        f"output.root={out}",
        "rounds=2",
        "train.local_steps=20",
        "federation.connect_timeout=60",
        *(ports[:1] if simulation else ports),
        *extra,
    ]


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``."""
    return carrying("FEDALIGN_TEST_MARK", marker)


def run_cli(args: list[str], marker: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDALIGN_TEST_MARK": marker}
    return subprocess.run(
        [FEDALIGN, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def run_folder(stdout: str) -> Path:
    line = next(row for row in stdout.splitlines() if row.startswith("run folder:"))
    return Path(line.split(":", 1)[1].strip())


# FedKA with all its blocks (disentangler, MK-MMD, vote) and class-aware alignment, its sources
# merged by their float16 Fishers: the deployment that most tests of this file read.
FEDKA_FISHER = (
    "strategy=fedka_fisher",
    "strategy.embed_samples=64",
    "strategy.vote_samples=256",
    "strategy.finetune_steps=8",
    "strategy.fisher.samples=64",
    "strategy.fisher.transport=float16",
    "strategy.disentangle.enabled=true",
    "strategy.class_align.enabled=true",
    "strategy.class_align.min_count=4",
)


@pytest.fixture(scope="module")
def deployment_run(digits_cache, tmp_path_factory):
    marker = uuid.uuid4().hex
    out = tmp_path_factory.mktemp("deploy")
    done = run_cli(
        ["run", *overrides(digits_cache, out, *FEDKA_FISHER, "wandb.mode=offline")], marker
    )
    return done, marker


def test_deployment_run_writes_a_complete_run_folder(deployment_run):
    done, marker = deployment_run
    assert done.returncode == 0, done.stderr[-2000:]
    folder = run_folder(done.stdout)
    lines = [json.loads(row) for row in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [row["round"] for row in lines] == [0, 1, 2]
    assert summary["final_target_accuracy"] > summary["initial_target_accuracy"] + 0.1
    assert all(set(row["silos"]) == {"mnist", "usps", "mnistm"} for row in lines)
    assert all(row["bytes_sent"] > 0 and row["bytes_received"] > 0 for row in lines[1:])
    for name in ("config.yaml", "accuracy.png", "final_weights.npz", "logs/superlink.log"):
        assert (folder / name).stat().st_size > 0, name
    for domain in ("mnist", "usps", "mnistm"):
        assert "SuperNode" in (folder / "logs" / f"silo-{domain}.log").read_text()
    assert list((folder / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert "mnistm (target)" in done.stdout  # the results table
    assert marked_pids(marker) == []
    assert all(isinstance(row["vote_agreement"], float) for row in lines[1:])
    assert all(isinstance(row["mmd"], float) for row in lines[1:])
    assert all(isinstance(row["domain_loss"], float) for row in lines[1:])
    assert lines[1]["class_stats_classes"] >= 1 and isinstance(lines[2]["class_align_loss"], float)


def test_deployment_used_separate_flower_processes(deployment_run):
    done, _ = deployment_run
    folder = run_folder(done.stdout)
    superlink_log = (folder / "logs" / "superlink.log").read_text()
    assert "Flower Deployment Runtime" in superlink_log or "SuperLink" in superlink_log
    node_ids = json.loads((folder / "summary.json").read_text())["silos"]
    assert sorted(node_ids.values()) == ["mnist", "mnistm", "usps"]
    assert len(set(node_ids)) == 3  # three SuperNodes registered with distinct IDs


def test_simulation_reproduces_the_deployment(deployment_run, digits_cache, tmp_path):
    deployed, _ = deployment_run
    marker = uuid.uuid4().hex
    args = overrides(digits_cache, tmp_path, *FEDKA_FISHER, "wandb.mode=disabled", simulation=True)
    done = run_cli(["simulate", *args], marker)
    assert done.returncode == 0, done.stderr[-2000:]
    sim = json.loads((run_folder(done.stdout) / "summary.json").read_text())
    dep = json.loads((run_folder(deployed.stdout) / "summary.json").read_text())
    assert sim["final_silo_accuracy"] == dep["final_silo_accuracy"]
    assert marked_pids(marker) == []
    # the warm deployment, the simulation and one process learn the same weights, bit for bit
    from fedalign.config import compose
    from server.inprocess import run_in_process

    cfg = compose(args)
    run_in_process(cfg, tmp_path / "in-process", threads=int(cfg.federation.threads_per_silo))
    runs = [run_folder(deployed.stdout), run_folder(done.stdout), tmp_path / "in-process"]
    weights = [dict(np.load(folder / "final_weights.npz")) for folder in runs]
    for name, array in weights[0].items():
        assert array.tobytes() == weights[1][name].tobytes() == weights[2][name].tobytes(), name


def test_port_in_use_is_one_line_and_starts_nothing(digits_cache, tmp_path):
    marker = uuid.uuid4().hex
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        args = overrides(digits_cache, tmp_path, f"federation.control_port={busy}")
        done = run_cli(["run", *args], marker, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert f"port {busy} on 127.0.0.1 is already in use" in done.stderr
    assert marked_pids(marker) == []
    assert list(tmp_path.iterdir()) == []  # output.root: no run folder, not even Hydra's


def test_unreachable_silo_fails_cleanly(digits_cache, tmp_path, monkeypatch):
    closed = free_ports(1)[0]
    original = LocalFederation.supernode_argv

    def wrong_address(self, index, silo):
        argv = original(self, index, silo)
        if silo.domain == "usps":
            argv[argv.index("--superlink") + 1] = f"127.0.0.1:{closed}"
        return argv

    seen: list[int] = []
    original_stop = LocalFederation.stop

    def recording_stop(self):
        seen.extend(self.procs.snapshot())
        original_stop(self)

    monkeypatch.setattr(LocalFederation, "supernode_argv", wrong_address)
    monkeypatch.setattr(LocalFederation, "stop", recording_stop)
    args = ("federation.connect_timeout=8", "federation.silo_runtime=false", "wandb.mode=disabled")
    cfg = compose(overrides(digits_cache, tmp_path, *args, domains=TWO_SILOS))
    validate(cfg)
    with pytest.raises(LaunchError, match=r"only 1/2 silos connected within 8s"):
        launch(cfg, tmp_path / "run", echo=lambda *_: None)
    assert len(seen) >= 3  # superlink + 2 supernodes (+ their Flower helpers)
    assert not [pid for pid in seen if pid_alive(pid)]


def test_bad_node_config_is_reported_by_the_server(digits_cache, tmp_path, monkeypatch):
    original = LocalFederation.supernode_argv

    def bad_role(self, index, silo):
        argv = original(self, index, silo)
        if silo.domain == "usps":
            at = argv.index("--node-config") + 1
            argv[at] = argv[at].replace('role="source"', 'role="boss"')
        return argv

    monkeypatch.setattr(LocalFederation, "supernode_argv", bad_role)
    args = ("federation.silo_runtime=false", "wandb.mode=disabled")
    cfg = compose(overrides(digits_cache, tmp_path, *args, domains=TWO_SILOS))
    validate(cfg)
    with pytest.raises(LaunchError) as info:
        launch(cfg, tmp_path / "run", echo=lambda *_: None)
    assert "silo usps: role='boss' is unknown (known: source, target)" in str(info.value)
    assert "\n" not in str(info.value)


def test_only_declared_records_cross_the_silo_boundary(deployment_run):
    """The audit of every message that crossed the SuperLink in the FedKA + Fisher deployment
    holds only model weights, the sources' Fishers, 64 target embeddings of 800 features, the
    target's class statistics (10 means, a pooled variance, a 10-long mask) and named scalars:
    no discriminator, label or per-sample prediction."""
    done, _ = deployment_run
    folder = run_folder(done.stdout)
    from fedalign.models import build_model, get_weights

    model = build_model("digit_cnn")
    weights = {k: list(v.shape) for k, v in get_weights(model).items()}
    params = {n: list(p.shape) for n, p in model.named_parameters()}
    audit = [json.loads(row) for row in (folder / "boundary.jsonl").read_text().splitlines()]
    types = {(row["direction"], row["type"]) for row in audit}
    assert ("sent", "train.vote") in types and ("received", "query.embed") in types
    for row in audit:
        for name, arrays in row.get("arrays", {}).items():
            shapes = {key: shape for key, (_, shape) in arrays.items()}
            if name == "embeddings":
                assert shapes == {"embeddings": [64, 800]}, row
            elif name == "fisher":
                assert shapes == params, row
                assert {dtype for dtype, _ in arrays.values()} == {"float16"}, row
            elif name == "fisher-scale":
                assert set(arrays) == set(params), row
            elif name == "class-stats":
                assert shapes == {"means": [10, 800], "variance": [800], "present": [10]}, row
            else:
                assert name == "arrays" or name.startswith("model."), row
                assert shapes == weights, row
    replies = [r for r in audit if r["direction"] == "received" and r["silo"] != "mnistm"]
    trained = [r for r in replies if r["type"] == "train"]
    assert len(trained) == 4  # 2 sources x 2 rounds, each with its Fisher
    assert all(set(r["arrays"]) == {"arrays", "fisher", "fisher-scale"} for r in trained)
    assert all(set(r.get("arrays", {})) <= {"arrays", "fisher", "fisher-scale"} for r in replies)
    stats = [(r["direction"], r["type"]) for r in audit if "class-stats" in r.get("arrays", {})]
    # the target's statistics of rounds 1 and 2; the sources receive round 1's in round 2
    assert sorted(stats) == [("received", "train.vote")] * 2 + [("sent", "train")] * 2
