"""``fedalign silo check`` and ``fedalign silo join``: a site checks its own data, sees what
would leave it, and starts its SuperNode (docs/onboarding.md)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from fedalign.cli import _console, fail

# What leaves a silo that joins, by its role (README, "What crosses a silo boundary").
LEAVES = {
    "source": [
        "its domain name, role and sample counts",
        "its model weights after local training, every round (same names and shapes as the "
        "global model)",
        "scalar metrics: training loss, accuracy and loss on its own test split, MMD, seconds",
        "with strategy fisher or fedka_fisher: the diagonal Fisher of those weights",
    ],
    "target": [
        "its domain name, role and sample counts",
        "with FedKA/FedVote: the fine-tuned global weights and M embeddings (the global model's "
        "features of M of its unlabelled training inputs)",
        "scalar metrics: accuracy and loss on its own test split, vote agreement and kept fraction",
    ],
}


def silo_command(argv: list[str]) -> None:
    if argv[:1] == ["runtime"]:  # its own parser: client/silo_runtime.py
        from client.silo_runtime import main as runtime_main

        sys.exit(runtime_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="fedalign silo")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser(
        "runtime",
        help="a warm runtime for this silo's ClientApps (--dir DIR [--watch-pid PID] [-- CMD])",
    )
    check = sub.add_parser("check", help="validate a site's data and show what it would share")
    check.add_argument("path", type=Path, help="the silo's data folder (or .npz file)")
    check.add_argument("--domain", help="the silo's domain name (default: the folder's name)")
    check.add_argument("--montage", type=Path, help="write a PNG of samples per class here")
    join = sub.add_parser("join", help="check the data, say what leaves, start the SuperNode")
    join.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:9092")
    join.add_argument("--data", type=Path, required=True, help="the silo's data folder")
    join.add_argument("--domain", required=True, help="the silo's name in the federation")
    join.add_argument("--root-certificates", type=Path, help="the federation's ca.crt")
    join.add_argument("--key", type=Path, help="this silo's private key (authentication)")
    join.add_argument(
        "--insecure", action="store_true", help="plaintext (only on a trusted network)"
    )
    join.add_argument("--port", type=int, default=9094, help="the SuperNode's own API port")
    join.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to keep trying to reach the SuperLink before giving up (default: 60)",
    )
    join.add_argument("--state-dir", type=Path, help="where the silo keeps state between rounds")
    join.add_argument(
        "--runtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a warm runtime handles the silo's messages (default; --no-runtime: cold ClientApps)",
    )
    join.add_argument(
        "--dry-run", action="store_true", help="print the command and a compose env file only"
    )
    for p in (check, join):
        p.add_argument(
            "--source",
            choices=("imagefolder", "npz", "digits5"),
            help="kind of data (default: npz when the folder holds a .npz file, else imagefolder)",
        )
        p.add_argument("--role", choices=("source", "target"), default="source")
        p.add_argument(
            "--classes",
            default=",".join(str(i) for i in range(10)),
            help="the federation's class names, in order (default: the digits 0..9)",
        )
        p.add_argument("--image-size", type=int, default=28, help="images are resized to this")
        p.add_argument("--channels", type=int, default=3, choices=(1, 3))
        p.add_argument("--min-train", type=int, default=10, help="fewest training samples")
    args = parser.parse_args(argv)
    if args.action == "join":
        args.path, args.montage = args.data, None
        check_address(args.superlink)
        if args.connect_timeout <= 0:
            fail(f"silo join: --connect-timeout must be > 0 (got {args.connect_timeout:g})", 2)
        _check_join_security(args)
    kind, domain = _silo_check(args)
    if args.action == "join":
        _silo_join(args, kind, domain)


def _silo_check(args: argparse.Namespace) -> tuple[str, str]:
    """Load and check the silo's data, print its counts and what leaves; (kind, domain)."""
    from rich.table import Table

    from fedalign.data import get_source
    from fedalign.data.montage import write_split_montage
    from fedalign.data.schema import check_split, class_counts

    path = args.path
    if not path.exists():
        fail(f"silo {args.action}: {path} does not exist", 2)
    holds_npz = path.suffix == ".npz" or (path.is_dir() and any(path.glob("*.npz")))
    kind = args.source or ("npz" if holds_npz else "imagefolder")
    classes = tuple(args.classes.split(","))
    options = {
        "imagefolder": {"image_size": args.image_size, "channels": args.channels},
        "npz": {"classes": classes},
    }.get(kind, {})
    source = get_source(kind, cache_dir=path, **options)
    domain = args.domain or source.domains()[0]
    split = check_split(source.load(domain), classes, args.min_train)
    console = _console()
    kind_of = (
        f"feature vectors of {split.input_shape[0]}"
        if split.is_features
        else "images " + "x".join(map(str, split.input_shape))
    )
    console.print(
        f"silo '{domain}' ({kind}, {path}): {len(split.y_train)} training and "
        f"{len(split.y_test)} test samples, {kind_of}"
    )
    table = Table(title="samples per class")
    for column in ("class", "train", "test"):
        table.add_column(column, justify="right")
    for name, (train, test) in class_counts(split).items():
        table.add_row(name, str(train), str(test))
    console.print(table)
    if args.montage and not split.is_features:
        write_split_montage(args.montage, [split], f"silo {domain}: test samples per class")
        console.print(f"montage: {args.montage}")
    console.print(f"What leaves this silo as a {args.role} (nothing else does):")
    for item in LEAVES[args.role]:
        console.print(f"  - {item}")
    console.print("Never: images, feature vectors, labels, predictions or file names.")
    console.print("ok: this silo's data fits the federation")
    return kind, domain


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


def _check_join_security(args: argparse.Namespace) -> None:
    """Secure by default: a CA certificate (and a key) unless --insecure says otherwise."""
    if args.insecure and (args.root_certificates or args.key):
        fail("silo join: --insecure contradicts --root-certificates/--key; choose one", 2)
    if not args.insecure and not args.root_certificates:
        fail("silo join: give --root-certificates ca.crt (and --key), or --insecure", 2)
    for given in (args.root_certificates, args.key):
        if given is not None and not given.is_file():
            fail(f"silo join: {given} not found", 2)


def _silo_join(args: argparse.Namespace, kind: str, domain: str) -> None:
    """Start this silo's SuperNode (TLS and its key unless --insecure), or print the command."""
    import shlex

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
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
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
