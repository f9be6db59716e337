"""Warm silos (client/warm.py, client/silo_runtime.py): a long-lived runtime per silo serves the
ClientApp's messages over an authenticated Unix socket, learns exactly what the cold path
learns, and fails safe: absent, other code, killed mid-message, orphaned."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client import warm
from client.app import app as client_app
from fedalign.config import compose, validate
from fedalign.protocol import ARRAYS, CONFIG, METRICS
from server.inprocess import run_in_process
from server.processes import descendants, pid_alive
from tests.conftest import make_context, silo_config

pytestmark = pytest.mark.usefixtures("task_identity")
ROOT = Path(__file__).resolve().parents[1]


class Runtime:
    """A supervisor (``python -m client.silo_runtime``) in a short folder under /tmp."""

    def __init__(self, watch_pid: int | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fa-rt-", dir="/tmp")) / "rt"
        argv = [sys.executable, "-m", "client.silo_runtime", "--dir", str(self.folder)]
        if watch_pid is not None:
            argv += ["--watch-pid", str(watch_pid)]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.wait_for("silo runtime ready")

    def wait_for(self, text: str) -> str:
        """Read the supervisor's log until a line holds ``text`` (the worker says when)."""
        for line in self.proc.stderr:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the runtime ended before saying {text!r}: {self.lines}")

    def worker(self) -> int:
        (pid,) = descendants(self.proc.pid)
        return pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.folder.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def runtime():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 1, 0
    served = Runtime()
    yield served
    served.stop()


def train_message(cache: Path, steps: int = 3) -> Message:
    import torch

    from fedalign.models import build_model, get_weights
    from fedalign.protocol import to_record

    torch.manual_seed(0)
    content = RecordDict(
        {
            ARRAYS: to_record(get_weights(build_model("digit_cnn"))),
            CONFIG: ConfigRecord(silo_config(cache, **{"local-steps": steps})),
        }
    )
    return Message(content, 7, "train")


def node(folder: Path) -> dict:
    return {"domain": "usps", "role": "source", "runtime-dir": str(folder)}


def never_cold(message: Message, context) -> Message:
    raise AssertionError("the message was handled cold")


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=fedavg"],
        [
            "strategy=fedka",
            "strategy.class_align.enabled=true",
            "strategy.class_align.min_count=2",
            "strategy.embed_samples=32",
            "strategy.vote_samples=64",
            "strategy.finetune_steps=3",
        ],
        ["strategy=fisher", "strategy.fisher.samples=16"],
    ],
    ids=["fedavg", "fedka", "fisher"],
)
def test_a_warm_run_learns_exactly_what_a_cold_run_learns(
    runtime, strategy, tmp_path, digits_cache
):
    cfg = compose(
        [
            "data.domains=[mnist,usps,mnistm]",
            "data.target=mnistm",
            f"data.cache_dir={digits_cache}",
            "wandb.mode=disabled",
            "train.local_steps=3",
            "rounds=2",
            *strategy,
        ]
    )
    validate(cfg)
    weights, accuracies = {}, {}
    for mode, folder in (("cold", None), ("warm", runtime.folder)):
        summary = run_in_process(cfg, tmp_path / mode, threads=1, runtime_dir=folder)
        assert summary["status"] == "completed"
        weights[mode] = dict(np.load(tmp_path / mode / "final_weights.npz"))
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        accuracies[mode] = [json.loads(line)["target_accuracy"] for line in lines]
    assert weights["cold"].keys() == weights["warm"].keys()
    for name, array in weights["cold"].items():
        assert array.tobytes() == weights["warm"][name].tobytes(), name
    assert accuracies["cold"] == accuracies["warm"]
    assert "the runtime refused" not in "".join(runtime.lines)


def test_the_clientapp_imports_no_torch_on_the_warm_path(runtime, digits_cache):
    """A fresh process, like Flower's flwr-clientapp: it forwards and never imports torch."""
    code = f"""
import sys, time, json
started = time.time()
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.app import app
from server.inprocess import make_context
from fedalign.protocol import CONFIG, METRICS
loaded = time.time() - started
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 1, 0
content = RecordDict({{CONFIG: ConfigRecord({json.dumps(silo_config(digits_cache))})}})
context = make_context(7, {{"domain": "usps", "role": "source", "runtime-dir": "{runtime.folder}"}})
reply = app(Message(content, 7, "query.info"), context)
print(json.dumps({{"torch": "torch" in sys.modules, "loaded": loaded,
                  "train": reply.content[METRICS]["num-train"],
                  "start": reply.content[METRICS]["start-seconds"]}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["torch"] is False
    assert out["train"] == 1438  # usps, loaded and counted by the runtime
    assert out["start"] >= out["loaded"] > 0  # the ClientApp's own start-up, not the runtime's


def test_the_channel_is_owner_only_and_needs_the_key(runtime):
    folder = runtime.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / warm.SOCKET).stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / warm.KEY).stat().st_mode) == 0o600
    with pytest.raises(AuthenticationError):
        Client(str(folder / warm.SOCKET), family="AF_UNIX", authkey=b"not the key")
    with warm.connect(folder) as conn:  # the runtime still serves the right key afterwards
        conn.send_bytes(json.dumps({"protocol": warm.PROTOCOL, "code": "?"}).encode())
        assert json.loads(conn.recv_bytes())["serve"] is False


def test_a_second_runtime_for_a_served_folder_is_refused(runtime):
    done = subprocess.run(
        [sys.executable, "-m", "client.silo_runtime", "--dir", str(runtime.folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: a silo runtime already serves {runtime.folder}; stop it, or give this silo "
        "another folder"
    ]
    with warm.connect(runtime.folder):  # the first one still serves
        pass


def test_the_launcher_starts_no_runtimes_that_would_not_fit_in_memory(monkeypatch, tmp_path):
    from server import launcher

    said: list[str] = []
    federation = launcher.LocalFederation(compose([]), tmp_path, echo=said.append)
    try:
        monkeypatch.setattr(launcher, "available_memory", lambda: 20 * 2**30)
        assert federation.runtimes_fit(5)
        assert not federation.runtimes_fit(53)
        assert said == [
            "warning: 53 silo runtimes would hold about 37 GiB and 20 GiB are free: the silos "
            "work cold (a fresh process per message); federation.silo_runtime=false says so "
            "without this warning"
        ]
    finally:
        federation.stop()


def test_a_runtime_serves_the_clientapp_and_keeps_its_context_state(runtime, digits_cache):
    context = make_context(7, node(runtime.folder))
    reply = warm.forward(train_message(digits_cache), context, never_cold)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[METRICS]["num-examples"] == 1438
    assert reply.content[METRICS]["import-seconds"] == 0.0
    assert len(context.state.array_records) > 0  # the optimizer's moments came back
    assert reply.metadata.message_type == "train"  # a reply made here, to the local message


def test_an_absent_runtime_means_a_cold_start_and_one_log_line(tmp_path, digits_cache, caplog):
    context = make_context(7, node(tmp_path / "nobody"))
    with caplog.at_level(logging.INFO, logger="fedalign.client"):
        reply = client_app(train_message(digits_cache), context)
    assert not reply.has_error()
    lines = [r.getMessage() for r in caplog.records if "runtime" in r.getMessage()]
    assert len(lines) == 1 and "no silo runtime serves" in lines[0], lines
    assert "this ClientApp does the work (cold start)" in lines[0]


def test_a_runtime_with_other_code_is_not_used(runtime, digits_cache, caplog, monkeypatch):
    monkeypatch.setattr(warm, "code_fingerprint", lambda: "another fedalign version")
    cold = []

    def handled_here(message, context):
        cold.append(message.metadata.message_type)
        return Message(RecordDict(), reply_to=message)

    with caplog.at_level(logging.WARNING, logger="fedalign.client"):
        warm.forward(
            train_message(digits_cache), make_context(7, node(runtime.folder)), handled_here
        )
    assert cold == ["train"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "runs other code" in line and "this ClientApp does the work" in line


def test_a_runtime_killed_mid_message_is_an_error_reply_and_comes_back(digits_cache, monkeypatch):
    served = Runtime()
    try:
        first_worker = served.worker()
        real_connect = warm.connect

        class KillAfterSending:
            """The connection, but the worker is SIGKILLed once the message is sent."""

            def __init__(self, conn) -> None:
                self.conn, self.sent = conn, 0

            def send_bytes(self, data: bytes) -> None:
                self.conn.send_bytes(data)
                self.sent += 1
                if self.sent == 3:  # hello, message, context: the worker is working now
                    os.kill(first_worker, signal.SIGKILL)

            def __getattr__(self, name):
                return getattr(self.conn, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.conn.close()

        monkeypatch.setattr(warm, "connect", lambda folder: KillAfterSending(real_connect(folder)))
        context = make_context(7, node(served.folder))
        reply = warm.forward(train_message(digits_cache, steps=200), context, never_cold)
        assert reply.has_error() and reply.error.code == warm.RUNTIME_LOST
        assert "its silo runtime exited while handling train" in reply.error.reason
        monkeypatch.setattr(warm, "connect", real_connect)
        served.wait_for("worker exited (signal 9 (SIGKILL)); restarting it")
        served.wait_for("silo runtime ready")
        assert served.worker() != first_worker
        again = warm.forward(train_message(digits_cache), context, never_cold)
        assert not again.has_error()
    finally:
        served.stop()


def test_a_runtime_whose_supernode_is_gone_exits_and_leaves_nothing():
    supernode = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    served = Runtime(watch_pid=supernode.pid)
    worker = served.worker()
    supernode.stdin.close()  # the stand-in SuperNode exits
    supernode.wait(timeout=30)
    assert served.proc.wait(timeout=30) == 0
    assert not pid_alive(worker)
    assert not (served.folder / warm.SOCKET).exists() and not (served.folder / warm.KEY).exists()
    served.stop()  # it has exited; this removes its folder


def test_a_folder_too_deep_for_a_socket_path_still_serves(tmp_path, digits_cache):
    """AF_UNIX paths end at 107 bytes; a deeper folder is reached through its open handle."""
    deep = tmp_path / ("x" * 120)
    assert len(str(deep / warm.SOCKET)) > warm.MAX_SOCKET_PATH
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "client.silo_runtime", "--dir", str(deep)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        for line in supervisor.stderr:
            if "silo runtime ready" in line:
                break
        context = make_context(7, node(deep))
        reply = warm.forward(train_message(digits_cache), context, never_cold)
        assert not reply.has_error() and reply.content[METRICS]["num-examples"] == 1438
    finally:
        supervisor.terminate()
        assert supervisor.wait(timeout=30) == 0
    assert not (deep / warm.SOCKET).exists()


def test_an_executor_runs_under_its_runtime_and_they_end_together(tmp_path, request):
    """``fedalign silo runtime --dir D -- CMD``: CMD (a container's executor) sees
    FEDALIGN_RUNTIME_DIR; when it exits, the runtime stops and passes its exit code on."""
    folder = Path(tempfile.mkdtemp(prefix="fa-rt-", dir="/tmp")) / "rt"
    request.addfinalizer(lambda: shutil.rmtree(folder.parent, ignore_errors=True))
    seen = tmp_path / "seen"
    command = (
        "import os, sys, pathlib; pathlib.Path(sys.argv[1]).write_text("
        "os.environ['FEDALIGN_RUNTIME_DIR']); sys.stdin.read(); sys.exit(3)"
    )
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client.silo_runtime",
            "--dir",
            str(folder),
            "--",
            sys.executable,
            "-c",
            command,
            str(seen),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    for line in supervisor.stderr:
        if "silo runtime ready" in line:
            break
    workers = [p for p in descendants(supervisor.pid) if "client.runtime_worker" in _cmdline(p)]
    assert len(workers) == 1
    supervisor.stdin.close()  # the executor stand-in exits with code 3
    assert supervisor.wait(timeout=30) == 3
    assert seen.read_text() == str(folder)
    assert not pid_alive(workers[0])


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
