"""A silo runtime: one long-lived process per silo that handles its messages warm.

``python -m client.silo_runtime --dir DIR [--watch-pid PID] [-- COMMAND ...]`` (``fedalign silo
runtime``) is a small supervisor that imports no torch. It makes ``DIR`` owner-only (0700) and
keeps one worker (``client/runtime_worker.py``) alive, which serves the messages that ClientApps
hand it (``client/warm.py``) over a Unix domain socket in ``DIR``. No network port is opened.
When the worker dies, the supervisor starts another (at most ``MAX_RESTARTS`` within a minute);
when the watched process (the silo's SuperNode, or ``COMMAND``: a container's executor) is gone,
or on SIGTERM, it stops its worker, removes the socket and key, and exits: no orphans.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing import AuthenticationError
from pathlib import Path

from client.warm import (
    KEY,
    RUNTIME_DIR_ENV,
    SOCKET,
    connect,
)

log = logging.getLogger("fedalign.runtime")

MAX_RESTARTS = 5  # worker deaths within RESTART_WINDOW seconds before the supervisor gives up
RESTART_WINDOW = 60.0
WATCH_SECONDS = 0.5  # how often the supervisor looks at its worker and the watched process


class RuntimeSetupError(Exception):
    """The runtime folder cannot be used (one line for the operator)."""


def prepare_folder(folder: Path) -> None:
    """Create ``folder`` owner-only, or check that an existing one is ours and make it so."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid != os.getuid():
            raise RuntimeSetupError(f"runtime folder {folder} belongs to another user")
        folder.chmod(0o700)
    except OSError as exc:
        raise RuntimeSetupError(f"runtime folder {folder} cannot be used: {exc}") from None


def refuse_if_served(folder: Path) -> None:
    """A live runtime already serving ``folder`` is left alone: two would steal each other's
    socket."""
    try:
        with connect(folder):
            pass
    except (OSError, EOFError, AuthenticationError):
        return  # nobody (a stale socket, or none)
    raise RuntimeSetupError(
        f"a silo runtime already serves {folder}; stop it, or give this silo another folder"
    )


def clean(folder: Path) -> None:
    for name in (SOCKET, KEY):
        (folder / name).unlink(missing_ok=True)


# -------------------------------------------------------------------------- the supervisor
def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def supervise(
    folder: Path,
    watch_pid: int | None = None,
    command: list[str] | None = None,
    label: str | None = None,
) -> int:
    """Keep a worker alive until the watched process exits or SIGTERM; return the exit code.

    Parameters
    ----------
    folder : Path
        The runtime folder (socket and key).
    watch_pid : int, optional
        Stop when this process (the silo's SuperNode) is gone.
    command : list of str, optional
        Run this command (e.g. the silo's ``flower-superexec``) as a child with
        ``FEDALIGN_RUNTIME_DIR`` set, watch it instead, and return its exit code: a container's
        executor and its runtime then live and die together.
    label : str, optional
        The silo's name in the worker's log lines.
    """
    prepare_folder(folder)
    refuse_if_served(folder)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    child = None
    if command:
        env = {**os.environ, RUNTIME_DIR_ENV: str(folder)}
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            raise RuntimeSetupError(f"cannot start {command[0]}: {exc}") from None
    deaths: deque[float] = deque()
    argv = [sys.executable, "-m", "client.runtime_worker", "--dir", str(folder)]
    argv += ["--silo", label] if label else []
    code = 0
    while not stopping.is_set():
        worker = subprocess.Popen(argv)
        while worker.poll() is None and not stopping.is_set():
            if child is not None and child.poll() is not None:
                log.info(
                    "%s exited (%s); the runtime stops", command[0], _describe(child.returncode)
                )
                stopping.set()
            elif not _alive(watch_pid):
                log.info("the silo's SuperNode (pid %d) is gone; the runtime stops", watch_pid)
                stopping.set()
            else:
                stopping.wait(WATCH_SECONDS)
        if stopping.is_set():
            _stop(worker)
            break
        now = time.monotonic()
        deaths.append(now)
        while deaths and deaths[0] < now - RESTART_WINDOW:
            deaths.popleft()
        if len(deaths) > MAX_RESTARTS:
            log.error(
                "the runtime's worker died %d times within %.0f s (last: %s); giving up: "
                "the ClientApps do the work themselves",
                len(deaths),
                RESTART_WINDOW,
                _describe(worker.returncode),
            )
            code = 1
            break
        log.warning("the runtime's worker exited (%s); restarting it", _describe(worker.returncode))
    clean(folder)
    if child is not None:
        _stop(child)  # on SIGTERM: pass it on; when it exited by itself: reap it
        code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    return code


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def main(argv: list[str] | None = None) -> int:
    """``fedalign silo runtime --dir DIR [--silo NAME] [--watch-pid PID] [-- COMMAND ...]``."""
    parser = argparse.ArgumentParser(
        prog="fedalign silo runtime", description="a warm runtime for one silo's ClientApps"
    )
    parser.add_argument("--dir", required=True, type=Path, help="the silo's runtime folder")
    parser.add_argument("--silo", help="the silo's name in log lines (default: the folder's)")
    parser.add_argument("--watch-pid", type=int, help="exit when this process (a SuperNode) exits")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: run this (the executor) with it"
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s runtime[{args.silo or args.dir.name}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return supervise(args.dir, args.watch_pid, command or None, args.silo)
    except RuntimeSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if command:  # the executor still runs: its ClientApps work cold
            os.execvpe(command[0], command, {**os.environ})
        return 2


if __name__ == "__main__":
    sys.exit(main())
