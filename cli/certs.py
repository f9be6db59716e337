"""``fedalign certs``: a CA, the SuperLink's TLS certificate and one key per silo."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedalign.config import compose, silos, validate


def certs_command(argv: list[str]) -> None:
    """Parse ``fedalign certs DIR [--san A] [--silo S] [overrides]`` and write what is missing.

    Parameters
    ----------
    argv : list of str
        The command line after ``fedalign certs``.
    """
    parser = argparse.ArgumentParser(
        prog="fedalign certs",
        description="Make a CA, the SuperLink's TLS certificate and one key per silo "
        "(docs/security.md). Existing files are kept.",
    )
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument(
        "--san",
        action="append",
        help="an address silos use to reach the SuperLink (IP or DNS name; repeat); "
        "127.0.0.1, ::1 and localhost are always included",
    )
    parser.add_argument(
        "--silo",
        action="append",
        help="a silo to make a key for (repeat). Default: every silo of the config, "
        "after the overrides (data.domains, one per shard with data.shards)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.shards=3")
    args = parser.parse_args(argv)
    from server.certs import DEFAULT_SANS, make_certificates

    names = args.silo
    if not names:
        cfg = compose(args.overrides)
        validate(cfg)
        names = [silo.domain for silo in silos(cfg)]
    # The loopback names are always in: the same folder then serves a run on this machine and
    # `fedalign submit` next to the SuperLink (docs/security.md).
    sans = list(dict.fromkeys([*DEFAULT_SANS, *(args.san or [])]))
    paths = make_certificates(args.out, names, sans)
    print(f"CA: {paths['ca']} (give to every silo); keep {paths['ca_key']} private")
    print(f"SuperLink: {paths['cert']}, {paths['key']} (SANs: {', '.join(sans)})")
    print(f"silo keys: {args.out / 'silos'}/<silo> (private, one per silo) and <silo>.pub")
