"""Submit the app to a running SuperLink with ``flwr run`` and follow it to its end.

Used by the local launcher (its own SuperLink) and by ``fedalign submit`` (any SuperLink: a
compose federation, a multi-machine deployment). The run's config travels as the one run-config
key ``config-json``; ``flwr run --stream`` exits 0 even when a run fails, so the final status
comes from ``flwr ls``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedalign.config import to_json
from fedalign.errors import FedalignError
from server.processes import ENV_BIN

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedalign"
LOG_PREFIX = "fedalign |"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SubmitError(FedalignError):
    """The app could not be submitted or its run did not finish."""


def flower_bin(name: str) -> str:
    """A console script of this environment (next to the running Python) or on PATH."""
    local = ENV_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise SubmitError(f"`{name}` not found; install fedalign with `make install`")
    return found


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with one connection, ``fedalign``, to ``address`` (the
    SuperLink's Control API): TLS with ``root_certificates``, else plaintext."""
    security = (
        f'root-certificates = "{root_certificates}"\n' if root_certificates else "insecure = true\n"
    )
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{security}'
    )


def wait_reachable(address: str, seconds: float) -> None:
    """Return once ``address`` (HOST:PORT) accepts a TCP connection; raise ``SubmitError``
    after ``seconds``. For a SuperLink whose container starts beside ours."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise SubmitError(
                    f"the SuperLink at {address} did not accept connections within "
                    f"{seconds:g}s ({exc.strerror or exc}); check that it runs and listens there"
                ) from None
        time.sleep(0.5)


def register_keys(public_keys: list[Path], env: dict[str, str]) -> None:
    """``flwr supernode register`` each silo's public key (a key registered before is fine)."""
    for key in public_keys:
        out = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(key), CONNECTION],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        text = ANSI.sub("", (out.stdout + out.stderr).strip())
        if out.returncode != 0 and "already" not in text.lower():
            last = "".join(text.splitlines()[-1:])
            raise SubmitError(f"registering the key {key} failed: {last}")


def submit(
    cfg: DictConfig,
    env: dict[str, str],
    work_dir: Path,
    log_path: Path,
    echo: Callable[[str], Any] = print,
    verbose: bool = False,
    extra_args: tuple[str, ...] = (),
    on_line: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """``flwr run`` the app with ``cfg``, stream its log to ``log_path`` and our ``fedalign |``
    lines to ``echo``; returns (run ID, Flower's final status, e.g. ``finished:completed``)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run_config = work_dir / "run-config.toml"
    run_config.write_text(f"config-json = {json.dumps(to_json(cfg))}\n")
    argv = [
        flower_bin("flwr"),
        "run",
        str(APP_DIR),
        CONNECTION,
        "--run-config",
        str(run_config),
        "--stream",
        *extra_args,
    ]
    run_id = None
    lines: list[str] = []
    with (
        log_path.open("w") as server_log,
        subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(work_dir),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        ) as flwr_run,
    ):
        for raw in flwr_run.stdout:
            line = ANSI.sub("", raw.rstrip("\n"))
            lines = [*lines[-20:], line]
            server_log.write(line + "\n")
            server_log.flush()
            if run_id is None and (found := re.search(r"[Ss]tarted run (\d+)", line)):
                run_id = found.group(1)
                echo(f"submitted run {run_id}; streaming (full log: {server_log.name})")
            if LOG_PREFIX in line:
                echo(line.split(LOG_PREFIX, 1)[1].strip())
            elif verbose:
                echo(line)
            if on_line:
                on_line()
    if run_id is None:
        raise SubmitError(f"`flwr run` did not start a run: {flower_error(lines)}")
    return run_id, run_status(run_id, env)


def flower_error(lines: list[str]) -> str:
    """The message of the last error panel the ``flwr`` CLI drew (``╭─ Error ─╮ │ text │``),
    else its last non-empty line."""
    start = max((i for i, line in enumerate(lines) if line.lstrip().startswith("╭")), default=-1)
    if start >= 0:
        body = [line.strip().strip("│").strip() for line in lines[start + 1 :]]
        text = " ".join(part for part in body if part and not part.startswith("╰"))
        if text:
            return text
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")


def run_status(run_id: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [flower_bin("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"
