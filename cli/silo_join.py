"""``fedalign silo join``: start this silo's SuperNode (and its warm runtime) against the
federation's SuperLink, and say in one line why it could not connect when it gives up."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from cli.output import fail


def check_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` split into host and port; one ``error:`` line (exit 2)
    for anything else, before any check or process starts.

    Parameters
    ----------
    address : str
        The SuperLink's Fleet API address as the user typed it.

    Returns
    -------
    tuple of (str, int)
        The host (without brackets) and the port.
    """
    import ipaddress

    found = re.fullmatch(r"\[([^\]\s]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", address)
    problem = "it is not HOST:PORT or [IPv6]:PORT"
    if found:
        host, port = (found.group(1), found.group(2)) if found.group(1) else found.group(3, 4)
        if found.group(1):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                found, problem = None, f"{host} is not an IPv6 address"
        if found and not 0 < int(port) < 65536:
            found, problem = None, f"port {port} is outside 1-65535"
    if not found:
        fail(
            f"silo join: --superlink {address!r}: {problem}; give the SuperLink's Fleet API "
            "address, e.g. 10.0.0.5:9092 or [2001:db8::5]:9092",
            2,
        )
    return host, int(port)


# What Flower's last words on a failed connection mean, in order (the first match wins).
CONNECT_FAILURES = (
    (
        ("CERTIFICATE_VERIFY_FAILED", "SSL", "handshake", "certificate"),
        "TLS handshake failed",
        "that --root-certificates is the federation's ca.crt and that the SuperLink's certificate "
        "names this address (fedalign certs --san)",
    ),
    (
        ("Connection refused",),
        "connection refused",
        "that the SuperLink is running and its Fleet API listens on this address and port",
    ),
    (
        (
            "No route to host",
            "Network is unreachable",
            "DNS resolution failed",
            "Name or service",
            "Deadline Exceeded",
            "Timeout occurred",
            "timed out",
        ),
        "no route to it",
        "the address, this machine's network and any firewall between here and the SuperLink",
    ),
    (
        ("2004", "2001", "Failed to activate", "must be registered"),
        "this silo's key was refused",
        "that this silo's public key was registered (fedalign register)",
    ),
)


def connect_failure(address: str, timeout: float, output: list[str]) -> str:
    """The one line for a SuperNode that gave up connecting, from its last output lines."""
    start = max((i for i, line in enumerate(output) if "Exit Code" in line), default=0)
    text = " ".join(output[start : start + 5])  # Flower's exit message, not other log lines
    for needles, what, check in CONNECT_FAILURES:
        if any(needle in text for needle in needles):
            return (
                f"silo join: could not connect to the SuperLink at {address} within "
                f"{timeout:g}s ({what}); check {check}"
            )
    last = next((line.strip() for line in reversed(output) if line.strip()), "no output")
    return f"silo join: the SuperNode for {address} exited: {last}"


def check_join_security(args: argparse.Namespace) -> None:
    """Secure by default: a CA certificate (and a key) unless --insecure says otherwise."""
    if args.insecure and (args.root_certificates or args.key):
        fail("silo join: --insecure contradicts --root-certificates/--key; choose one", 2)
    if not args.insecure and not args.root_certificates:
        fail("silo join: give --root-certificates ca.crt (and --key), or --insecure", 2)
    for given in (args.root_certificates, args.key):
        if given is not None and not given.is_file():
            fail(f"silo join: {given} not found", 2)


def join_silo(args: argparse.Namespace, kind: str, domain: str) -> None:
    """Start this silo's SuperNode (TLS and its key unless --insecure), or print the command."""
    import shlex

    from server.processes import scripts_first_on_path
    from server.submit import flower_bin

    node_config = (
        f'domain="{domain}" role="{args.role}" data-source="{kind}" '
        f'data-dir="{args.data.resolve()}"'
        + (f' state-dir="{args.state_dir.resolve()}"' if args.state_dir else "")
    )
    runtime = runtime_folder(args, domain) if args.runtime else None
    if runtime is not None:
        node_config += f' runtime-dir="{runtime}"'
    security = ["--insecure"]
    if args.root_certificates:
        security = ["--root-certificates", str(args.root_certificates.resolve())]
    if args.key:
        security += ["--auth-supernode-private-key", str(args.key.resolve())]
    argv = [
        flower_bin("flower-supernode"),
        *security,
        "--superlink",
        args.superlink,
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--max-wait-time",  # Flower's own deadline: it gives up and exits 305
        f"{args.connect_timeout:g}",
    ]
    print("command: " + shlex.join(["flower-supernode", *argv[1:]]))
    if runtime is not None:
        print(f"and its warm runtime: fedalign silo runtime --dir {runtime} --watch-pid <its pid>")
    if args.dry_run:
        print("or with Docker, docker/silo.env for docker/silo.compose.yml (docs/containers.md):")
        print(f"  FEDALIGN_SUPERLINK={args.superlink}")
        print(f"  FEDALIGN_SILO={domain}\n  FEDALIGN_ROLE={args.role}")
        print(f"  FEDALIGN_DATA={args.data.resolve()}\n  FEDALIGN_DATA_SOURCE={kind}")
        if args.root_certificates:  # the folder must hold ca.crt and the key named <silo>
            print(f"  FEDALIGN_SECRETS={args.root_certificates.resolve().parent}")
        return
    print(f"joining as silo {domain}; stop with Ctrl-C (the federation goes on without it)")
    sys.stdout.flush()
    env = scripts_first_on_path({**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})
    code, output = _run_supernode(argv, env, runtime, domain)
    if code != 0:
        fail(connect_failure(args.superlink, args.connect_timeout, output))


def runtime_folder(args: argparse.Namespace, domain: str) -> Path:
    """The silo's runtime folder: under --state-dir, else the default silo state folder."""
    from client.state import STATE_DIR_ENV
    from fedalign.data.cache import default_cache_dir

    chosen = args.state_dir or os.environ.get(STATE_DIR_ENV)
    root = Path(chosen).resolve() if chosen else default_cache_dir() / "silo-state"
    return root / "runtime" / domain


def _run_supernode(
    argv: list[str], env: dict[str, str], runtime: Path | None, domain: str
) -> tuple[int, list[str]]:
    """Run the SuperNode (and its warm runtime, when ``runtime`` names its folder), echo its
    output, and stop it and every helper it spawned (also on Ctrl-C); returns its exit code
    and its last output lines."""
    import subprocess
    import threading

    from server.processes import ManagedProcess, ProcessSet
    from server.submit import ANSI

    procs = ProcessSet(env=env)
    output: list[str] = []

    exited = threading.Event()

    def echo(stream: Any) -> None:
        for raw in stream:
            if exited.is_set():
                continue  # its helpers being stopped (their tracebacks), not the SuperNode
            line = ANSI.sub("", raw.rstrip("\n"))
            output[:] = [*output[-200:], line]
            print(line, flush=True)

    try:
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=procs.env,
            start_new_session=True,  # Ctrl-C reaches us; we stop it and its helpers
        )
        procs.processes.append(ManagedProcess("supernode", popen, Path(os.devnull)))
        if runtime is not None:
            log = runtime.parent / f"{domain}.log"
            command = [sys.executable, "-m", "client.silo_runtime", "--dir", str(runtime)]
            command += ["--silo", domain, "--watch-pid", str(popen.pid)]
            procs.start("runtime", command, log)
            print(f"silo runtime for {domain} starting (log: {log})", flush=True)
        # Its helpers (flower-superexec) inherit the pipe: the SuperNode's exit, not the
        # pipe's end, says it is done.
        reader = threading.Thread(target=echo, args=(popen.stdout,), daemon=True)
        reader.start()
        code = popen.wait()
        exited.set()
    finally:
        procs.stop()
    reader.join()
    return code, output
