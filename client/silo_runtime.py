"""A silo runtime: one long-lived process per silo that handles its messages warm.

``python -m client.silo_runtime --dir DIR [--watch-pid PID]`` (``fedalign silo runtime``) is a
small supervisor that imports no torch. It keeps one worker process alive: the worker imports
torch and the ClientApp's handlers once, pays ``torch._dynamo``'s import on a throw-away optimizer
step once, and then serves messages that ClientApps hand it (``client/warm.py``) over a Unix
domain socket in ``DIR``: the folder is owner-only (0700), the socket 0600, and every connection
must prove it knows the random key the worker writes to ``DIR/runtime.key`` (0600) at each start
(``multiprocessing.connection``'s HMAC challenge, both ways). No network port is opened and no
pickled object is read: messages and contexts travel as Flower's protobufs.

A worker serves only an app whose code fingerprint equals its own (another fedalign version is
refused and the ClientApp does the work itself). Before each message it resets torch's global
generator to a fresh process's seed, so a warm reply equals a cold one to the last bit. When the
worker dies, the supervisor starts another (at most ``MAX_RESTARTS`` within a minute); when the
watched process (the silo's SuperNode) is gone, or on SIGTERM, the supervisor stops its worker,
removes the socket and key, and exits: no orphans.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from client.warm import (
    KEY,
    PROTOCOL,
    RUNTIME_DIR_ENV,
    SERVING,
    SOCKET,
    code_fingerprint,
    connect,
    socket_address,
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


def write_key(folder: Path) -> bytes:
    """A fresh random key in ``folder/runtime.key`` (0600), replaced atomically."""
    key = secrets.token_bytes(32)
    tmp = folder / f".{KEY}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    tmp.replace(folder / KEY)
    return key


def clean(folder: Path) -> None:
    for name in (SOCKET, KEY):
        (folder / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the worker
def warm_up() -> int:
    """Import what every message needs and pay ``torch._dynamo``'s import (the first optimizer
    step) now; return the seed of torch's global generator in a fresh process."""
    import torch

    import client.app  # noqa: F401 - the handlers and everything they import at module level
    import fedalign.models
    import fedalign.train  # noqa: F401

    fresh_seed = torch.initial_seed()
    weight = torch.zeros(1, requires_grad=True)  # no random numbers drawn
    optimizer = torch.optim.Adam([weight], lr=0.1)
    (weight * 2).sum().backward()
    optimizer.step()
    return fresh_seed


def handle(conn: Connection, fingerprint: str, fresh_seed: int) -> None:
    """Serve one message on ``conn`` (see ``client.warm.exchange`` for the other side)."""
    import torch
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from client.app import app
    from strategies.utils import CONFIG

    hello = json.loads(conn.recv_bytes())
    if hello.get("protocol") != PROTOCOL or hello.get("code") != fingerprint:
        why = (
            f"runs other code (fingerprint {fingerprint[:12]}, the app's "
            f"{str(hello.get('code'))[:12]}, protocol {hello.get('protocol')})"
        )
        conn.send_bytes(json.dumps({"serve": False, "why": why}).encode())
        log.warning("refused a message: it %s", why)
        return
    conn.send_bytes(json.dumps({"serve": True}).encode())
    message = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
    context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
    rnd = message.content[CONFIG].get("server-round") if CONFIG in message.content else None
    log.info("handling %s (round %s)", message.metadata.message_type, rnd)
    torch.manual_seed(fresh_seed)  # what a fresh ClientApp process would start from
    try:
        reply = app(message, context)
    except Exception as exc:
        log.exception("the handler of %s failed", message.metadata.message_type)
        conn.send_bytes(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    conn.send_bytes(json.dumps({"ok": True}).encode())
    conn.send_bytes(message_to_proto(reply).SerializeToString())
    conn.send_bytes(context_to_proto(context).SerializeToString())


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os._exit(0)  # the supervisor is gone: no orphan

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def listen(folder: Path, key: bytes, stack: contextlib.ExitStack) -> Listener:
    """Bind the socket (0600) in ``folder``; ``stack`` keeps what it needs open."""
    (folder / SOCKET).unlink(missing_ok=True)
    address = stack.enter_context(socket_address(folder))
    previous = os.umask(0o177)
    try:
        return stack.enter_context(Listener(address, family="AF_UNIX", authkey=key))
    finally:
        os.umask(previous)


def serve(folder: Path) -> None:
    """The worker: warm up, then serve one message per connection until killed."""
    _exit_with_parent()
    started = time.time()
    fresh_seed = warm_up()
    fingerprint = code_fingerprint()
    key = write_key(folder)
    with contextlib.ExitStack() as stack:
        listener = listen(folder, key, stack)
        SERVING[0] = True
        log.info(
            "silo runtime ready at %s in %.1f s (code %s)",
            folder / SOCKET,
            time.time() - started,
            fingerprint[:12],
        )
        while True:
            try:
                conn = listener.accept()
            except AuthenticationError:
                log.warning("refused a connection that did not know the runtime's key")
                continue
            except (EOFError, OSError) as exc:  # it hung up during the handshake
                log.warning("a connection ended before it was authenticated: %r", exc)
                continue
            with conn:
                try:
                    handle(conn, fingerprint, fresh_seed)
                except (EOFError, OSError) as exc:
                    log.warning("a ClientApp went away mid-message: %s", exc)


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


def supervise(folder: Path, watch_pid: int | None = None, command: list[str] | None = None) -> int:
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
    argv = [sys.executable, "-m", "client.silo_runtime", "--serve", "--dir", str(folder)]
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
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
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
        if args.serve:
            # nothing to flush: a worker keeps no state that outlives a message
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            serve(args.dir)
            return 0
        return supervise(args.dir, args.watch_pid, command or None)
    except RuntimeSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if command and not args.serve:  # the executor still runs: its ClientApps work cold
            os.execvpe(command[0], command, {**os.environ})
        return 2


if __name__ == "__main__":
    sys.exit(main())
