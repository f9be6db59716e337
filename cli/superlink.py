"""``fedalign submit`` and ``fedalign register``: the commands that talk to a SuperLink that is
already up (a compose or multi-machine federation: docker/), through Flower's ``flwr``."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from cli.output import fail
from fedalign.config import compose, validate
from fedalign.errors import FedalignError


def _connection_args(parser: argparse.ArgumentParser) -> None:
    """The options both commands take: the SuperLink's address, its CA, how long to wait."""
    parser.add_argument("--superlink", required=True, help="the SuperLink's Control API address")
    parser.add_argument(
        "--root-certificates",
        type=Path,
        help="the federation's CA certificate (TLS); else plaintext",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the SuperLink to accept connections (containers that "
        "start together); default: try once",
    )


def _flower_env(tmp: str, args: argparse.Namespace) -> dict[str, str]:
    """A throw-away FLWR_HOME with one connection to ``args.superlink``."""
    from server.submit import wait_reachable, write_connection

    if args.root_certificates and not args.root_certificates.is_file():
        fail(f"CA certificate {args.root_certificates} not found", 2)
    if args.wait < 0:
        fail(f"--wait must be >= 0 seconds, not {args.wait:g}", 2)
    if args.wait:
        wait_reachable(args.superlink, args.wait)
    home = Path(tmp) / "flwr"
    ca = args.root_certificates.resolve() if args.root_certificates else None
    write_connection(home, args.superlink, ca)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def register_command(argv: list[str]) -> None:
    """Register silo public keys with the SuperLink (SuperNode authentication).

    Parameters
    ----------
    argv : list of str
        The command line after ``fedalign register``.
    """
    parser = argparse.ArgumentParser(prog="fedalign register")
    _connection_args(parser)
    parser.add_argument(
        "keys", type=Path, nargs="+", help="silo public keys (KEY.pub), or folders of them"
    )
    args = parser.parse_args(argv)
    from server.submit import register_keys

    keys = []
    for path in args.keys:
        found = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if not found or not all(key.is_file() for key in found):
            fail(f"register: no silo public key at {path}; make keys with `fedalign certs`", 2)
        keys += [key.resolve() for key in found]
    with tempfile.TemporaryDirectory(prefix="fedalign-register-") as tmp:
        register_keys(keys, _flower_env(tmp, args))
    print(f"registered {len(keys)} silo key(s): {', '.join(k.stem for k in keys)}")


def submit_command(argv: list[str]) -> None:
    """Run the app with the config of ``argv``'s overrides on the SuperLink, to its end.

    Parameters
    ----------
    argv : list of str
        The command line after ``fedalign submit``.
    """
    parser = argparse.ArgumentParser(prog="fedalign submit")
    _connection_args(parser)
    parser.add_argument("--verbose", action="store_true", help="print Flower's own log lines too")
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if o.startswith("-")]:
        fail(f"submit: unknown option {bad[0]} (hydra overrides are key=value)", 2)
    from server.submit import submit

    try:
        cfg = compose(overrides)
        validate(cfg)
    except FedalignError as exc:
        fail(str(exc), code=2)
    with tempfile.TemporaryDirectory(prefix="fedalign-submit-") as tmp:
        env = _flower_env(tmp, args)
        print(
            f"fedalign {cfg.name}: submitting to {args.superlink} ({len(cfg.data.domains)} silos)"
        )
        log = Path(tmp) / "server.log"
        run_id, status = submit(cfg, env, Path(tmp), log, verbose=args.verbose)
        if status != "finished:completed":
            fail(f"run {run_id} ended {status}: {''.join(log.read_text().splitlines()[-1:])}")
    print(f"run {run_id}: {status}")
