"""The silo runtime's worker: the warm process that handles a silo's messages.

Started and kept alive by the supervisor (``client/silo_runtime.py``) as ``python -m
client.runtime_worker --dir DIR``. It imports torch and the ClientApp's handlers once, pays
``torch._dynamo``'s import on a throw-away optimizer step once, writes a fresh random key to
``DIR/runtime.key`` (0600), and serves one message per connection on ``DIR/runtime.sock``
(0600): every connection must pass ``multiprocessing.connection``'s HMAC challenge with that
key, both ways; messages and contexts travel as Flower's protobufs, nothing is unpickled. It
serves only an app whose code fingerprint equals its own, and before each message it resets
torch's global generator to a fresh process's seed, so a warm reply equals a cold one to the
last bit. It exits when its supervisor is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from client.warm import KEY, PROTOCOL, SERVING, SOCKET, code_fingerprint, socket_address
from fedalign import atomic

log = logging.getLogger("fedalign.runtime")
WATCH_SECONDS = 0.5  # how often the worker looks for its supervisor


def write_key(folder: Path) -> bytes:
    """A fresh random key in ``folder/runtime.key`` (0600), replaced atomically."""
    key = secrets.token_bytes(32)
    atomic.write_bytes(folder / KEY, key, mode=0o600)
    return key


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
    from fedalign.protocol import CONFIG

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
    """The worker: listen, warm up, then serve one message per connection until killed.

    It listens before it warms up: a ClientApp that connects meanwhile waits in the handshake
    until the worker accepts, so the silo's first message is served warm even when it arrives
    while torch is still being imported."""
    _exit_with_parent()
    started = time.time()
    fingerprint = code_fingerprint()
    key = write_key(folder)
    with contextlib.ExitStack() as stack:
        listener = listen(folder, key, stack)
        fresh_seed = warm_up()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.runtime_worker")
    parser.add_argument("--dir", required=True, type=Path, help="the silo's runtime folder")
    parser.add_argument("--silo", help="the silo's name in log lines (default: the folder's)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s runtime[{args.silo or args.dir.name}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # nothing to flush: a worker keeps no state that outlives a message
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    serve(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
