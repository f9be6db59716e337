"""``fedalign data``: build or verify the offline Digits-5 cache, draw its montage, or write the
feature-shift task."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.output import fail


def data_command(argv: list[str]) -> None:
    """Parse ``fedalign data build|montage|features ...`` and do it.

    Parameters
    ----------
    argv : list of str
        The command line after ``fedalign data``.
    """
    parser = argparse.ArgumentParser(prog="fedalign data")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build or verify the offline Digits-5 cache")
    montage = sub.add_parser("montage", help="write a PNG montage of every domain")
    features = sub.add_parser(
        "features", help="write the feature-shift task (fedalign/data/feature_shift.py)"
    )
    features.add_argument("out", type=Path, help="folder for <domain>/<domain>.npz and all/")
    for p in (build, montage, features):
        p.add_argument("--seed", type=int, default=0)
    for p in (build, montage):
        p.add_argument("--cache-dir", default=None, help="cache folder (default: see README)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    build.add_argument(
        "--per-silo",
        action="store_true",
        help="one folder per domain, <cache-dir>/<domain>/, to mount into that silo alone",
    )
    montage.add_argument("--out", type=Path, default=Path("outputs/digits5-montage.png"))
    args = parser.parse_args(argv)
    from fedalign.data import DIGITS5_DOMAINS, build_all, write_montage

    if args.action == "features":
        from fedalign.data.feature_shift import write_feature_shift

        for name, path in write_feature_shift(args.out, seed=args.seed).items():
            print(f"{name}: {path}")
    elif args.action == "build" and args.per_silo:
        if not args.cache_dir:
            fail("data build --per-silo needs --cache-dir DIR", 2)
        for domain in DIGITS5_DOMAINS:
            folder = Path(args.cache_dir) / domain
            path = build_all(folder, seed=args.seed, force=args.force, domains=(domain,))[domain]
            print(f"{domain}: {path}")
    elif args.action == "build":
        for domain, path in build_all(args.cache_dir, seed=args.seed, force=args.force).items():
            print(f"{domain}: {path}")
    else:
        print(write_montage(args.out, cache_dir=args.cache_dir, seed=args.seed))
