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

import signal
import sys

from cli.output import fail
from fedalign.errors import FedalignError


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


def dispatch(command: str, rest: list[str]) -> None:
    """Run one subcommand; each module is imported only when its command is given."""
    if command in ("run", "simulate"):
        from cli.run import run_hydra

        run_hydra(rest if command == "run" else ["federation=simulation", *rest])
    elif command == "data":
        from cli.data import data_command

        data_command(rest)
    elif command in ("grid", "results"):
        from cli.grid import grid_command

        grid_command(command, rest)
    elif command == "certs":
        from cli.certs import certs_command

        certs_command(rest)
    elif command == "submit":
        from cli.superlink import submit_command

        submit_command(rest)
    elif command == "register":
        from cli.superlink import register_command

        register_command(rest)
    elif command == "silo":
        from cli.silo import silo_command

        silo_command(rest)
    else:
        fail(f"unknown command '{command}' (see fedalign --help)", 2)


def main(argv: list[str] | None = None) -> None:
    """The ``fedalign`` console script.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``fedalign`` (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        dispatch(argv[0], argv[1:])
    except FedalignError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted: federation stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
