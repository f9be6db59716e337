"""Start Flower's own processes and tear them down completely (no orphans, ports freed)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SET_TOKEN_ENV = "FEDALIGN_PROCESS_SET"
ENV_BIN = Path(sys.executable).parent  # this environment's console scripts


def scripts_first_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with this environment's console scripts first on PATH.

    Flower's processes start further Flower commands (``flower-superexec``,
    ``flwr-clientapp``) by name, so a SuperNode or SuperLink started from a virtual
    environment that is not activated needs them found there.

    Parameters
    ----------
    env
        The environment to copy.
    """
    return {**env, "PATH": os.pathsep.join([str(ENV_BIN), env.get("PATH", "")])}


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _each_process(filename: str) -> Iterator[tuple[int, bytes]]:
    """``(pid, content of /proc/<pid>/<filename>)`` for every process that can be read."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/{filename}").read_bytes()
            except OSError:
                continue


def _parent_map() -> dict[int, int]:
    # Field 4 of stat is the parent PID; the command name (field 2) may contain spaces.
    return {pid: int(stat.rsplit(b")", 1)[1].split()[1]) for pid, stat in _each_process("stat")}


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_map().items():
        children.setdefault(parent, []).append(child)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def carrying(name: str, value: str) -> list[int]:
    """Live processes whose environment holds ``name=value`` (inherited by every descendant,
    even one that was reparented after its parent exited)."""
    wanted = f"{name}={value}".encode()
    return [
        pid
        for pid, environ in _each_process("environ")
        if wanted in environ.split(b"\0") and pid_alive(pid)
    ]


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    reported: bool = False  # its exit was already told to the user

    def exited(self) -> int | None:
        return self.popen.poll()

    def last_line(self) -> str:
        try:
            lines = [
                row for row in self.log_path.read_text(errors="replace").splitlines() if row.strip()
            ]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""


@dataclass
class ProcessSet:
    """Processes started in their own sessions; ``stop()`` ends them and every descendant.

    Every process gets ``FEDALIGN_PROCESS_SET=<token>`` in its environment, so a descendant
    that outlived its parent (Ray's helpers in a simulation, an executor's child) is still
    found through ``/proc`` and stopped.
    """

    env: dict[str, str]
    processes: list[ManagedProcess] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.env = {**self.env, SET_TOKEN_ENV: self.token}

    def start(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` with the set's environment (or ``env``), logging to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env if env is None else {**env, SET_TOKEN_ENV: self.token},
                cwd=cwd,
                start_new_session=True,
            )
        proc = ManagedProcess(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def snapshot(self) -> set[int]:
        """Remember every live descendant (they may be reparented once a parent exits)."""
        for proc in self.processes:
            self.seen_pids.add(proc.popen.pid)
            self.seen_pids.update(descendants(proc.popen.pid))
        self.seen_pids.update(carrying(SET_TOKEN_ENV, self.token))
        return set(self.seen_pids)

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM everything, SIGKILL what is left after ``grace`` seconds; returns leftovers."""
        pids = self.snapshot()
        for proc in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            for proc in self.processes:
                proc.popen.poll()
            for pid in self.snapshot() - pids:  # started while the others were stopping
                pids.add(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.1)
        pids = self.snapshot()
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        deadline = time.monotonic() + 5  # a killed process takes a moment to be gone
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        return [pid for pid in pids if pid_alive(pid)]
