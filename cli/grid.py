"""``fedalign grid`` and ``fedalign results``: run a preset's cells (grid only), then write
docs/results*.md, .csv and .png from the run folders."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from cli.output import fail, make_console


def grid_command(action: str, argv: list[str]) -> None:
    """Parse ``fedalign grid|results PRESET ...`` and do it.

    Parameters
    ----------
    action : str
        ``grid`` (run the unfinished cells, then write the results) or ``results`` (write only).
    argv : list of str
        The command line after the action.
    """
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
        echo = make_console().print
        counts = run_grid(preset, args.root.resolve(), echo=echo, workers=args.workers)
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
