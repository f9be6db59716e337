"""The ``fedalign`` command.

    fedalign run [hydra overrides] [-m]     run a federation on this machine (real processes)
    fedalign simulate [hydra overrides]     the same in Flower's simulation engine
    fedalign data build [--force]           build/verify the offline Digits-5 cache
                        [--per-silo]        (one folder per domain, for containers)
    fedalign data montage [--out PNG]       a picture of every domain
    fedalign data features DIR              the feature-shift task (64-d features, 3 domains)
    fedalign grid PRESET [--root DIR]       run a resumable grid (conf/grid/PRESET.yaml) and
                                            write docs/results*.md, .csv and .png
    fedalign results PRESET [--root DIR]    regenerate those files from the run folders
    fedalign certs DIR [--san A] [--silo S] a CA, SuperLink certificate and silo keys for TLS
                   [hydra overrides]        and SuperNode authentication (docs/security.md);
                                            keys for every silo of the config by default
    fedalign submit --superlink HOST:PORT [--root-certificates CA] [hydra overrides]
                                            run the app on a SuperLink that is already up (a
                                            compose or multi-machine federation: docker/)
    fedalign register --superlink HOST:PORT --root-certificates CA KEY.pub|DIR ...
                                            register silo keys (SuperNode authentication)
    fedalign silo check PATH [--source S] [--classes a,b,..] [--montage PNG]
                                            validate a site's own data (ImageFolder tree, .npz
                                            features), count its classes, say what it shares
    fedalign silo join --superlink HOST:9092 --domain NAME --data PATH
                       --root-certificates CA --key KEY [--dry-run]
                                            the same check, then start this silo's SuperNode

Errors a user can fix print one line (``error: ...``) and exit non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import sys
from pathlib import Path
from typing import Any

from fedalign.config import CONF_DIR, ConfigError, compose, silos, validate
from fedalign.errors import FedalignError
from fedalign.runlog import MAX_SILO_LINES, mean_and_range, source_accuracies

INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
HYDRA_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
}


def _console() -> Any:
    from rich.console import Console

    # Piped output (CI, logs) gets a wide table instead of rich's 80-column default.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split Hydra CLI args into flags (with their values) and overrides."""
    flags, overrides, args = [], [], list(args)
    while args:
        arg = args.pop(0)
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in HYDRA_FLAGS_WITH_VALUE and args and not args[0].startswith("-")
            if takes_value and (arg != "--info" or args[0] in INFO_TOPICS):
                flags.append(args.pop(0))
        else:
            overrides.append(arg)
    return flags, overrides


def prevalidate(args: list[str]) -> None:
    """Compose and validate every job the args describe; a bad one fails before any start."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags, overrides = split_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    jobs = [overrides]
    if multirun:
        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except Exception as exc:
            raise ConfigError(f"config: {str(exc).splitlines()[0]}") from exc
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in jobs:
        cfg = compose(job)
        validate(cfg)
        key = "output.run_dir" if cfg.output.run_dir else "output.root"
        check_writable(Path(cfg.output.run_dir or cfg.output.root), key)


def check_writable(folder: Path, key: str) -> None:
    """Fail in one line unless ``folder`` can be created and written; whatever this check
    creates is removed again, so nothing is left when it fails.

    Parameters
    ----------
    folder : Path
        The run folder (``output.run_dir``) or the root that run folders go under.
    key : str
        The config key that chose ``folder`` (named in the error line).
    """
    import tempfile

    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output: cannot write to {folder} ({exc.strerror or type(exc).__name__}); "
            f"set {key} to a folder this user can write"
        ) from None
    finally:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


def ensure_data(cfg: Any, echo: Any) -> None:
    """Build (or verify) the cached domains of the embedded benchmark before silos start."""
    if cfg.data.source != "digits5":
        return
    from fedalign.config import external_silos
    from fedalign.data import build_all

    local = tuple(d for d in cfg.data.domains if d not in external_silos(cfg))
    echo(f"data: Digits-5 domains {list(local)} (cache: {cfg.data.cache_dir or 'default'})")
    build_all(cache_dir=cfg.data.cache_dir, seed=int(cfg.data.seed), domains=local)


def print_results(run_dir: Path, console: Any) -> None:
    from rich.table import Table

    lines = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines() if row]
    summary = json.loads((run_dir / "summary.json").read_text())
    target = summary["target"]
    # a silo that left before it reported anything is only in the rounds' dropped/absent lists
    named = [[*row["silos"], *row.get("dropped", []), *row.get("absent", [])] for row in lines]
    others = sorted({d for names in named for d in names} - {target})
    many = len(others) > MAX_SILO_LINES  # data.shards: the sources' mean, not a column each
    columns = [f"mean of {len(others)} sources"] if many else others
    table = Table(title=f"target: {target} (unseen domain)")
    for col in ["round", f"{target} (target)", *columns, "seconds", "MB sent", "MB recv"]:
        table.add_column(col, justify="right")
    for line in lines:
        if many:
            known = source_accuracies(line, others)
            accs = [mean_and_range(known)[0] if known else None]
        else:
            accs = [_silo_cell(line, d) for d in others]
        table.add_row(
            str(line["round"]),
            _pct(line["target_accuracy"]),
            *(a if isinstance(a, str) else _pct(a) for a in accs),
            f"{line['wall_seconds']:.1f}",
            f"{line['bytes_sent'] / 1e6:.2f}",
            f"{line['bytes_received'] / 1e6:.2f}",
        )
    console.print(table)
    console.print(
        f"target {target}: final {_pct(summary['final_target_accuracy'])}, "
        f"best {_pct(summary['best_target_accuracy'])} (round {summary['best_round']}), "
        f"mean of last 5 {_pct(summary['mean_last5_target_accuracy'])}, "
        f"untrained {_pct(summary['initial_target_accuracy'])}"
    )
    console.print(f"run folder: {run_dir}")


def _silo_cell(line: dict[str, Any], domain: str) -> float | str | None:
    """A silo's test accuracy of round r's model, measured when round r+1 starts; else what
    happened to it: ``dropped`` / ``absent`` in round r, or ``trained`` (it trained in round r
    but left before it could evaluate the result)."""
    metrics = line["silos"].get(domain, {})
    if "test-accuracy" in metrics:
        return float(metrics["test-accuracy"])
    for status in ("dropped", "absent"):
        if domain in line.get(status, []):
            return status
    return "trained" if "train-loss" in metrics else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def discard_unused(folder: Path) -> None:
    """Remove a run folder Hydra made if nothing but Hydra's own ``.hydra/`` is in it."""
    import shutil

    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra"}:
        shutil.rmtree(folder, ignore_errors=True)


def _job(cfg: Any) -> float | None:
    """One Hydra job: validate, build data, run the federation, print the table."""
    from hydra.core.hydra_config import HydraConfig

    from server.app import resume_config
    from server.launcher import launch, resumable_run

    console = _console()
    hydra_dir = run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        if cfg.resume:
            run_dir = resumable_run(cfg)
            cfg = resume_config(cfg, run_dir, list(HydraConfig.get().overrides.task))
        elif cfg.output.run_dir:
            run_dir = Path(cfg.output.run_dir)
        if run_dir.resolve() != hydra_dir.resolve():
            discard_unused(hydra_dir)  # Hydra's fresh folder is not used
        ensure_data(cfg, console.print)
        console.print(
            f"[bold]fedalign[/bold] {cfg.name}: {cfg.federation.mode}, "
            f"{len(silos(cfg))} silos, {cfg.rounds} rounds -> {run_dir}"
        )
        summary = launch(cfg, run_dir, echo=console.print)
    except FedalignError as exc:
        discard_unused(hydra_dir)  # a refused run leaves no folder
        fail(str(exc))
    print_results(run_dir, console)
    return summary["final_target_accuracy"]


def run_hydra(args: list[str]) -> None:
    import hydra

    try:
        prevalidate(args)
    except FedalignError as exc:
        fail(str(exc), code=2)
    flags, overrides = split_args(args)
    sys.argv = ["fedalign", *flags, *overrides]  # Hydra's argparse wants flags first
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_job)()
    except ValueError as exc:  # Hydra's own usage errors (flag combinations)
        fail(f"hydra: {str(exc).splitlines()[0]}", code=2)


def data_command(argv: list[str]) -> None:
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


def grid_command(action: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"fedalign {action}")
    parser.add_argument("preset", help="a name in conf/grid/ (smoke, full) or a .yaml path")
    parser.add_argument("--root", type=Path, default=Path("results"), help="run folders")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where results go")
    if action == "grid":
        parser.add_argument(
            "--workers",
            type=int,
            help="cells at once (engine in-process only; default: one per core)",
        )
    args = parser.parse_args(argv)
    from fedalign.results import write_results
    from server.experiments import (
        default_config,
        expected_config,
        load_preset,
        run_grid,
        settings_line,
    )

    preset = load_preset(args.preset)
    counts = {"failed": 0}
    if action == "grid":
        counts = run_grid(preset, args.root.resolve(), echo=_console().print, workers=args.workers)
        print(
            f"grid {preset['name']}: {counts['done']} run, {counts['skipped']} skipped, "
            f"{counts['failed']} failed"
        )
    paths = write_results(
        preset,
        args.root,
        args.docs,
        settings_line(preset),
        lambda target, method, seed: expected_config(preset, target, method, seed),
        functools.cache(lambda method: default_config(preset, method)),
    )
    print(f"results: {paths['md']}")
    if counts["failed"]:
        fail(f"{counts['failed']} cell(s) failed; run the same command again to retry them")


def certs_command(argv: list[str]) -> None:
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


def _connection_args(parser: argparse.ArgumentParser) -> None:
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
    import os

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
    parser = argparse.ArgumentParser(prog="fedalign register")
    _connection_args(parser)
    parser.add_argument(
        "keys", type=Path, nargs="+", help="silo public keys (KEY.pub), or folders of them"
    )
    args = parser.parse_args(argv)
    import tempfile

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
    parser = argparse.ArgumentParser(prog="fedalign submit")
    _connection_args(parser)
    parser.add_argument("--verbose", action="store_true", help="print Flower's own log lines too")
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if o.startswith("-")]:
        fail(f"submit: unknown option {bad[0]} (hydra overrides are key=value)", 2)
    import tempfile

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


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. CI or make killed) tears the federation down like Ctrl-C does."""
    raise KeyboardInterrupt


def setup_logging() -> None:
    """fedalign's own log lines (data builds, warnings) print plainly, whatever Hydra does."""
    import logging

    logger = logging.getLogger("fedalign")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            run_hydra(rest)
        elif command == "simulate":
            run_hydra(["federation=simulation", *rest])
        elif command == "data":
            data_command(rest)
        elif command in ("grid", "results"):
            grid_command(command, rest)
        elif command == "certs":
            certs_command(rest)
        elif command == "submit":
            submit_command(rest)
        elif command == "register":
            register_command(rest)
        elif command == "silo":
            from fedalign.site_cli import silo_command

            silo_command(rest)
        else:
            fail(f"unknown command '{command}' (see fedalign --help)", 2)
    except FedalignError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted: federation stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
