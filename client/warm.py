"""The ClientApp's side of a warm silo: hand each message to the silo's long-lived runtime.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message. A silo runtime
(``client/silo_runtime.py``) is one long-lived process per silo that keeps torch imported, the
silo's data loaded and its device context held. :func:`forward` is a Flower ClientApp *mod*: it
sends the message and the Context, serialized with Flower's own protobuf serde, to the runtime
over a Unix domain socket in the silo's runtime folder (owner-only, HMAC authentication with the
key the runtime wrote there: ``multiprocessing.connection``), and returns the runtime's reply and
updated Context state. Nothing is pickled; nothing new leaves the silo: the socket is a file on
the silo's own disk, and Flower still carries every message over the gRPC Fleet API.

Where the runtime lives: node-config ``runtime-dir``, else ``$FEDALIGN_RUNTIME_DIR``; with
neither (the simulation engine, an in-process run) every message is handled here, as before.
When a runtime is configured but cannot serve (absent, another user's key, other code than the
submitted app), this ClientApp does the work itself and logs one line saying why. When the
runtime dies mid-message, the reply is an error: the server drops the silo for that round.

This module must not import torch: on the warm path the ClientApp process only forwards.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path

from flwr.app import Context, Error, Message

log = logging.getLogger("fedalign.client")

RUNTIME_DIR_ENV = "FEDALIGN_RUNTIME_DIR"
SOCKET, KEY = "runtime.sock", "runtime.key"
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
PROTOCOL = 1
RUNTIME_LOST = 101  # error code of a reply whose runtime died while working on it
PACKAGES = ("client", "fedalign", "strategies")  # the code a runtime must share with the app

SERVING = [False]  # True inside a runtime: the mod then hands the message to the handlers


def runtime_dir(context: Context) -> Path | None:
    """The silo's runtime folder, or None when no runtime is configured for it."""
    chosen = context.node_config.get("runtime-dir") or os.environ.get(RUNTIME_DIR_ENV)
    return Path(str(chosen)) if chosen else None


@functools.lru_cache(maxsize=4)
def code_fingerprint(root: str | None = None) -> str:
    """SHA-256 over the app's Python sources (``client``, ``fedalign``, ``strategies`` below
    ``root``; default: where this module was imported from). A runtime serves only an app whose
    fingerprint equals its own."""
    base = Path(root) if root else Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            digest.update(path.relative_to(base).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@contextlib.contextmanager
def socket_address(folder: Path) -> Iterator[str]:
    """The address of the socket in ``folder``. A path longer than AF_UNIX allows (107 bytes)
    is reached through an open handle of the folder (``/proc/self/fd/N/``), so any folder
    serves."""
    path = str(folder / SOCKET)
    if len(path) <= MAX_SOCKET_PATH:
        yield path
        return
    handle = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{handle}/{SOCKET}"
    finally:
        os.close(handle)


def connect(folder: Path) -> Connection:
    """An authenticated connection to the runtime in ``folder`` (OSError or
    AuthenticationError when it cannot be had)."""
    key = (folder / KEY).read_bytes()
    with socket_address(folder) as address:
        return Client(address, family="AF_UNIX", authkey=key)


def _domain(context: Context) -> str:
    return str(context.node_config.get("domain", f"node {context.node_id}"))


def exchange(conn: Connection, message: Message, context: Context) -> Message | str:
    """Send one message to the runtime; the reply, or a one-line reason it refused to serve."""
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    conn.send_bytes(json.dumps({"protocol": PROTOCOL, "code": code_fingerprint()}).encode())
    answer = json.loads(conn.recv_bytes())
    if not answer.get("serve"):
        return str(answer.get("why", "it refused"))
    conn.send_bytes(message_to_proto(message).SerializeToString())
    conn.send_bytes(context_to_proto(context).SerializeToString())
    status = json.loads(conn.recv_bytes())
    if not status.get("ok"):
        raise RuntimeError(f"silo runtime: {status.get('error')}")
    reply = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
    state = context_from_proto(ProtoContext.FromString(conn.recv_bytes())).state
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(reply.content, reply_to=message)


def forward(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower mod: hand the message to the silo's runtime when one serves it, else do the work
    in this process (one log line says why, when a runtime was configured)."""
    folder = runtime_dir(context)
    if SERVING[0] or folder is None:
        return call_next(message, context)
    entered = time.time()
    domain = _domain(context)
    try:
        conn = connect(folder)
    except (OSError, EOFError, AuthenticationError) as exc:
        log.warning(
            "silo %s: no silo runtime serves %s (%s); this ClientApp does the work (cold start)",
            domain,
            folder,
            type(exc).__name__ if not str(exc) else exc,
        )
        return call_next(message, context)
    with conn:
        try:
            reply = exchange(conn, message, context)
        except (EOFError, OSError) as exc:
            reason = (
                f"silo {domain}: its silo runtime exited while handling "
                f"{message.metadata.message_type} ({type(exc).__name__}); the silo is left out "
                "of this round and its runtime restarts"
            )
            log.error(reason)
            return Message(Error(RUNTIME_LOST, reason), reply_to=message)
    if isinstance(reply, str):
        log.warning(
            "silo %s: the silo runtime at %s %s; this ClientApp does the work",
            domain,
            folder,
            reply,
        )
        return call_next(message, context)
    _stamp_start(reply, entered)
    return reply


def _stamp_start(reply: Message, entered: float) -> None:
    """The reply's start-up seconds are this ClientApp process's (the runtime started long
    ago); it imported no torch."""
    from client.runtime import process_started
    from fedalign.protocol import METRICS

    if reply.has_error() or METRICS not in reply.content.metric_records:
        return
    metrics = reply.content[METRICS]
    started = process_started()
    if started is not None:
        metrics["start-seconds"] = max(0.0, entered - started)
        metrics["import-seconds"] = 0.0
