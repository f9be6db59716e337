"""``fedalign run`` and ``fedalign simulate``: Hydra composes the config, every job is checked
before any starts, then each one builds its data, runs its federation and prints its table."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from cli.output import fail, make_console
from cli.round_table import print_results
from fedalign.config import CONF_DIR, ConfigError, compose, silos, validate
from fedalign.errors import FedalignError

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


def discard_unused(folder: Path) -> None:
    """Remove a run folder Hydra made if nothing but Hydra's own ``.hydra/`` is in it."""
    import shutil

    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra"}:
        shutil.rmtree(folder, ignore_errors=True)


def run_job(cfg: Any) -> float | None:
    """One Hydra job: validate, build data, run the federation, print the table."""
    from hydra.core.hydra_config import HydraConfig

    from fedalign.checkpoint import resume_config
    from fedalign.data.prepare import ensure_data
    from server.launcher import launch, resumable_run

    console = make_console()
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
    """Check every job of ``args`` (Hydra flags and overrides), then let Hydra run them.

    Parameters
    ----------
    args : list of str
        The command line after ``fedalign run``.
    """
    import hydra

    try:
        prevalidate(args)
    except FedalignError as exc:
        fail(str(exc), code=2)
    flags, overrides = split_args(args)
    sys.argv = ["fedalign", *flags, *overrides]  # Hydra's argparse wants flags first
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run_job)()
    except ValueError as exc:  # Hydra's own usage errors (flag combinations)
        fail(f"hydra: {str(exc).splitlines()[0]}", code=2)
