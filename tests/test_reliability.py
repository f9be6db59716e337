"""Faults injected for real into running deployments: a source SuperNode SIGKILLed mid-round,
the SuperLink SIGKILLed mid-run and the run resumed from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from cli.round_table import print_results
from fedalign.config import compose, silos
from server.inprocess import run_in_process
from server.launcher import LocalFederation
from server.processes import SET_TOKEN_ENV, carrying, descendants, pid_alive
from tests.conftest import free_ports, port_overrides, small_federation

pytestmark = pytest.mark.e2e
FEDALIGN = str(Path(sys.executable).parent / "fedalign")


def kill_tree(pid: int) -> None:
    for child in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def kill_worker_in_round_2(federation: LocalFederation, domain: str) -> int:
    """SIGKILL ``domain``'s runtime worker while it handles round 2's train message."""
    supervisor = next(p for p in federation.procs.processes if p.name == f"runtime-{domain}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the worker logs each message as it takes it
        if "handling train (round 2)" in supervisor.log_path.read_text():
            (worker,) = descendants(supervisor.popen.pid)
            os.kill(worker, signal.SIGKILL)
            return worker
        time.sleep(0.05)
    raise AssertionError(f"{domain}'s runtime never took round 2's train message")


def test_killed_silos_are_dropped_for_their_round_and_come_back(digits_cache, tmp_path):
    """Three faults in round 2 of one deployment. usps's SuperNode is SIGKILLed with the round's
    train message on its way, and a new SuperNode for usps starts: it rejoins under a new node
    ID in round 3. mnist's warm runtime worker is SIGKILLed while it trains: mnist's reply is an
    error, the runtime restarts the worker, and mnist trains warm again in round 3. syn's
    SuperNode is SIGKILLed for good: it is recorded as missing in every later round, and its
    runtime exits by itself."""
    run_dir = tmp_path / "run"
    cfg = small_federation(
        digits_cache,
        run_dir,
        "rounds=3",
        "train.local_steps=30",
        "federation.round_timeout=30",
        "federation.connect_timeout=60",
        domains=("mnist", "usps", "syn", "mnistm"),
    )
    seen: list[str] = []
    killed: dict[str, int] = {}

    def supernode(federation: LocalFederation, domain: str) -> int:
        return next(p for p in federation.procs.processes if p.name == f"silo-{domain}").popen.pid

    with LocalFederation(cfg, run_dir) as federation:

        def on_line(line: str) -> None:
            seen.append(line)
            if "round 2/3: training on" in line and not killed:
                for domain in ("usps", "syn"):  # the round's train message is on its way
                    killed[domain] = supernode(federation, domain)
                    kill_tree(killed[domain])
                index = [s.domain for s in silos(cfg)].index("usps")
                argv = federation.supernode_argv(index, silos(cfg)[index])
                argv[argv.index("--port") + 1] = str(free_ports(1)[0])
                federation.procs.start("silo-usps-again", argv, run_dir / "logs" / "usps2.log")
                killed["mnist"] = kill_worker_in_round_2(federation, "mnist")

        federation.echo = on_line
        federation.start()
        status = federation.submit()
        runtime_log = (run_dir / "logs" / "runtime-mnist.log").read_text()
        token = federation.procs.token

    assert status.startswith("finished:completed"), (status, seen[-10:])
    assert set(killed) == {"usps", "syn", "mnist"}
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for domain in ("usps", "mnist"):  # recorded in the metrics of the round each one missed
        assert domain in rounds[2]["dropped"], rounds[2]
        assert "train-loss" not in rounds[2]["silos"].get(domain, {})
        back = [r["round"] for r in rounds if "train-loss" in r["silos"].get(domain, {})]
        assert back == [1, 3], (domain, back)  # trained before and after the kill
        assert "test-accuracy" in rounds[-1]["silos"][domain]  # and evaluated the final model
    for line in rounds[2:]:  # syn: missing from the round it was killed in, and every later one
        assert "syn" in line.get("dropped", []) + line.get("absent", []), line
    assert [r["round"] for r in rounds if "train-loss" in r["silos"].get("syn", {})] == [1]
    assert any("silo usps rejoined on node" in line for line in seen)
    assert any("warning: silo-syn exited with signal 9 (SIGKILL) (log: " in x for x in seen)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["silos_not_finished"] == ["syn"]  # usps and mnist evaluated the final model
    assert "worker exited (signal 9 (SIGKILL)); restarting it" in runtime_log
    assert runtime_log.count("silo runtime ready") == 2
    assert "handling train (round 3)" in runtime_log  # mnist was served warm again, not cold
    assert not pid_alive(killed["mnist"])
    assert carrying(SET_TOKEN_ENV, token) == []  # syn's runtime too: no process is left
    console = Console(record=True, width=200)
    print_results(run_dir, console)
    table = console.export_text()
    # usps trained in round 1 and left before it evaluated that round's model: "trained", not "-"
    assert table_cell(table, 1, "usps") == "trained"
    assert table_cell(table, 2, "syn") in ("dropped", "absent")  # not "-"


def table_cell(out: str, rnd: int, column: str) -> str:
    """The cell of round ``rnd`` under ``column`` in the final table ``fedalign run`` printed."""
    rows = [[c.strip() for c in re.split("[│┃]", r)[1:-1]] for r in out.splitlines()]
    header = next(r for r in rows if r and r[0] == "round")
    return next(r for r in rows if r and r[0] == str(rnd))[header.index(column)]


@pytest.mark.parametrize(
    "when",
    [
        "round 2/5: training on",  # round 1 is in the run folder
        "SuperLink up on",  # before the ServerApp runs: no summary.json yet
    ],
)
def test_ctrl_c_is_recorded_as_interrupted(digits_cache, tmp_path, when):
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    argv = [
        FEDALIGN,
        "run",
        "data.domains=[usps,mnistm]",  # a source and the target are enough here
        f"data.cache_dir={digits_cache}",
        "rounds=5",
        "train.local_steps=10",
        "wandb.mode=disabled",
        f"output.run_dir={run_dir}",
        *port_overrides(2),
    ]
    env = {**os.environ, "FEDALIGN_TEST_MARK": marker}
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as run:
        for line in run.stdout:
            if when in line:
                assert carrying("FEDALIGN_TEST_MARK", marker), "the federation should be running"
                run.send_signal(signal.SIGINT)
                break
        _, err = run.communicate(timeout=120)
    assert run.returncode == 130
    assert err.strip() == "interrupted: federation stopped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["error"] == "interrupted by Ctrl-C or SIGTERM"
    assert carrying("FEDALIGN_TEST_MARK", marker) == []
    assert list(tmp_path.rglob(".hydra")) == []  # Hydra's unused run folder was removed


def server_pids(marker: str, name: str) -> list[int]:
    """Live processes of this test (their environment carries ``marker``) running ``name``."""
    found = []
    for pid in carrying("FEDALIGN_TEST_MARK", marker):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if name.encode() in cmdline:
            found.append(pid)
    return found


def test_superlink_killed_mid_run_resumes_to_identical_weights(digits_cache, tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, "FEDALIGN_TEST_MARK": marker, "FEDALIGN_CACHE": str(tmp_path / "cache")}
    base = [
        "data.domains=[usps,mnistm]",  # a source and the target are enough here
        f"data.cache_dir={digits_cache}",
        "rounds=2",
        "train.local_steps=10",
        "wandb.mode=disabled",
        "federation.connect_timeout=60",
    ]
    cwd = tmp_path / "cwd"  # where Hydra's default run folders (outputs/) would appear
    cwd.mkdir()

    def fedalign(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [FEDALIGN, *args], capture_output=True, text=True, env=env, timeout=400, cwd=cwd
        )

    # the uninterrupted run, in one process: bit-identical to a deployment (tests/test_e2e.py)
    reference = tmp_path / "reference"
    cfg = compose(base)
    run_in_process(cfg, reference, threads=int(cfg.federation.threads_per_silo))

    root = tmp_path / "runs"
    crashed = root / "crashed"
    with subprocess.Popen(
        [FEDALIGN, "run", *base, *port_overrides(2), f"output.run_dir={crashed}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    ) as run:
        for line in run.stdout:
            if "round 2/2: training on" in line:  # round 1 is checkpointed
                for pid in server_pids(marker, "flower-superlink"):
                    os.kill(pid, signal.SIGKILL)
                break
        out, err = run.communicate(timeout=300)
    assert run.returncode == 1
    logs = crashed / "logs"
    assert err.strip() == (
        f"error: run failed: the SuperLink exited with signal 9 (SIGKILL) (log: "
        f"{logs / 'superlink.log'}); continue it with `fedalign run resume={crashed}`"
    ), err
    assert "KeyboardInterrupt" not in out + err
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("the SuperLink exited with signal 9 (SIGKILL)")
    checkpoint = crashed / "checkpoint.npz"
    saved = checkpoint.read_bytes()
    lines_before = (crashed / "metrics.jsonl").read_text()
    first_log = (logs / "server.log").read_text()

    corrupt = root / "corrupt"  # a second unfinished run, its checkpoint the newer one
    shutil.copytree(crashed, corrupt)
    # cut in half, as a crash mid-write would leave it (a flipped byte can land in a zip header
    # field nothing reads, such as a member's timestamp, and leave the checkpoint sound)
    data = saved[: len(saved) // 2]
    (corrupt / "checkpoint.npz").write_bytes(data)
    # resume=true: the newest unfinished run under output.root, with its own config (no base)
    done = fedalign("run", *port_overrides(2), "resume=true", f"output.root={root}")
    assert done.returncode == 1
    error = [row for row in done.stderr.splitlines() if row.strip()]
    assert len(error) == 1 and "it was not loaded" in error[0], done.stderr
    assert f"checkpoint {corrupt / 'checkpoint.npz'} is unreadable" in error[0]  # the newest
    assert (corrupt / "checkpoint.npz").read_bytes() == data  # reported, left as it was
    assert (corrupt / "metrics.jsonl").read_text() == lines_before

    # resume=<run folder>: that run, with its own config.yaml (no base)
    done = fedalign("run", *port_overrides(2), f"resume={crashed}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout and "after round 1 of 2" in done.stdout
    with np.load(reference / "final_weights.npz") as a, np.load(crashed / "final_weights.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name  # bit for bit
    rounds = [json.loads(r)["round"] for r in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert (logs / "server.1.log").read_text() == first_log  # the first attempt's log is kept
    assert "resuming after round 1" in (logs / "server.log").read_text()
    assert list(cwd.rglob(".hydra")) == [] and sorted(root.iterdir()) == [corrupt, crashed]
    assert server_pids(marker, "flower") == []
