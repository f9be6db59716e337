"""``fedalign silo check`` and ``fedalign silo join``: a site checks its own data and sees what
would leave it (here), then starts its SuperNode (``cli/silo_join.py``; docs/onboarding.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.output import fail, make_console
from cli.silo_join import check_address, check_join_security, join_silo

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
    """Parse ``fedalign silo check|join|runtime ...`` and do it.

    Parameters
    ----------
    argv : list of str
        The command line after ``fedalign silo``.
    """
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
        check_join_security(args)
    kind, domain = check_silo(args)
    if args.action == "join":
        join_silo(args, kind, domain)


def check_silo(args: argparse.Namespace) -> tuple[str, str]:
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
    console = make_console()
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
