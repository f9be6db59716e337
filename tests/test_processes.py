"""ProcessSet tears down everything it started, including descendants whose parent exited."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from server.processes import ProcessSet, descendants, pid_alive, scripts_first_on_path

# The child starts a grandchild in a new session, prints its PID and exits at once: the
# grandchild is reparented and is no longer anyone's descendant in our tree.
ORPHANING = """
import subprocess, sys
grandchild = subprocess.Popen(
    [sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"],
    start_new_session=True, stdin=subprocess.DEVNULL,
)
print(grandchild.pid, flush=True)
"""


def _started_pid(log: Path, parent) -> int:
    parent.popen.wait(timeout=60)
    return int(log.read_text().split()[0])


def test_stop_ends_a_reparented_grandchild(tmp_path):
    procs = ProcessSet(env=dict(os.environ))
    log = tmp_path / "child.log"
    child = procs.start("child", [sys.executable, "-c", ORPHANING], log)
    grandchild = _started_pid(log, child)
    try:
        assert pid_alive(grandchild)
        assert grandchild not in descendants(child.popen.pid)
        assert procs.stop(grace=5) == []
        assert not pid_alive(grandchild)
    finally:
        if pid_alive(grandchild):
            os.kill(grandchild, 9)


def test_stop_leaves_processes_of_another_set_alone(tmp_path):
    ours, theirs = ProcessSet(env=dict(os.environ)), ProcessSet(env=dict(os.environ))
    log = tmp_path / "theirs.log"
    child = theirs.start("child", [sys.executable, "-c", ORPHANING], log)
    grandchild = _started_pid(log, child)
    try:
        ours.start("short", [sys.executable, "-c", "pass"], tmp_path / "ours.log").popen.wait(60)
        assert ours.stop(grace=5) == []
        assert pid_alive(grandchild)
    finally:
        theirs.stop(grace=5)
    assert not pid_alive(grandchild)


def test_flower_commands_started_by_name_are_this_environments(tmp_path):
    base = {"PATH": str(tmp_path), "KEEP": "1"}
    env = scripts_first_on_path(base)
    assert base["PATH"] == str(tmp_path)  # the given environment is left as it was
    assert env["KEEP"] == "1"
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), str(tmp_path)]
    found = shutil.which("flower-superexec", path=env["PATH"])
    assert found == str(Path(sys.executable).parent / "flower-superexec")
