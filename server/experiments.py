"""The experiment harness: run a grid of targets x methods x seeds, resumably.

Each cell is one federation run in Flower's simulation engine (``engine: simulation``, the
default: the same ServerApp and ClientApps as the deployment, measured to give identical
numbers, without starting six processes per run), in the local deployment
(``engine: deployment``), or in this process (``engine: in-process``, ``server/inprocess.py``:
no SuperLink, no Ray, silos one after another; bit-identical to the simulation, tested, and
fastest for small cells). A cell's run folder is ``<root>/<preset>/<target>/<method>/seed<k>``;
a cell whose summary.json says ``completed`` and whose config.yaml has the settings the preset
gives it now is skipped; anything else (interrupted, failed, or run before a preset or default
changed) is run again from scratch, so an interruption loses at most the cell in progress.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedalign import atomic
from fedalign.config import CONF_DIR, ConfigError, compose, silos, validate
from fedalign.data.prepare import ensure_data
from fedalign.errors import FedalignError
from fedalign.results import cell_dir, is_complete

PRESET_KEYS = {"name", "engine", "targets", "methods", "seeds", "overrides"}
ENGINES = ("simulation", "deployment", "in-process")
OPTIONAL_KEYS = {
    "per_target",  # target -> method -> extra overrides (e.g. from validation)
    "ablation",  # method -> the blocks it has on: the results' ablation table
    "goals",  # method -> {other method: points it must gain on the average}: met or not
}


def load_preset(name: str) -> dict[str, Any]:
    """``conf/grid/<name>.yaml`` (or a path to such a file), checked."""
    path = Path(name) if name.endswith(".yaml") else CONF_DIR / "grid" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "grid").glob("*.yaml")))
        raise ConfigError(f"grid: no preset '{name}' (known: {known}, or a path to a .yaml)")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not PRESET_KEYS <= set(preset) <= PRESET_KEYS | OPTIONAL_KEYS:
        raise ConfigError(
            f"grid: {path} must have the keys {sorted(PRESET_KEYS)} "
            f"(optional: {sorted(OPTIONAL_KEYS)})"
        )
    for target, methods in preset.get("per_target", {}).items():
        unknown = sorted(set(methods) - set(preset["methods"]))
        if target not in preset["targets"] or unknown:
            raise ConfigError(f"grid: per_target.{target} names no target or method {unknown}")
    unknown = sorted(set(preset.get("ablation", {})) - set(preset["methods"]))
    if unknown:
        raise ConfigError(f"grid: ablation names methods the preset lacks: {unknown}")
    named = {m for method, over in preset.get("goals", {}).items() for m in (method, *over)}
    unknown = sorted(named - set(preset["methods"]))
    if unknown:
        raise ConfigError(f"grid: goals name methods the preset lacks: {unknown}")
    if preset["engine"] not in ENGINES:
        raise ConfigError(f"grid: engine={preset['engine']!r} (use {', '.join(ENGINES)})")
    return preset


def method_overrides(preset: dict[str, Any], target: str, method: str) -> list[str]:
    """A cell's Hydra overrides but its seed."""
    federation = "local" if preset["engine"] == "deployment" else "simulation"
    return [
        f"federation={federation}",
        "wandb.mode=disabled",
        *preset["overrides"],
        *preset["methods"][method],
        *preset.get("per_target", {}).get(target, {}).get(method, []),
        f"data.target={target}",
    ]


def cell_overrides(preset: dict[str, Any], target: str, method: str, seed: int) -> list[str]:
    return [*method_overrides(preset, target, method), f"seed={seed}"]


@functools.lru_cache(maxsize=256)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose(list(overrides))


def expected_config(preset: dict[str, Any], target: str, method: str, seed: int) -> dict[str, Any]:
    """The resolved config the grid runs this cell with now (before it picks free ports).

    The seed is set after composing: the seeds of one target and method share one composition
    (Hydra's compose is most of the time a whole grid's check takes)."""
    cfg = copy.deepcopy(_composed(tuple(method_overrides(preset, target, method))))
    cfg.seed = seed
    return OmegaConf.to_container(cfg, resolve=True)


def default_config(
    preset: dict[str, Any] | None = None, method: str | None = None
) -> dict[str, Any]:
    """What a setting missing from an old run meant: the resolved config with no overrides but
    the method's choice of strategy (a strategy's own new setting defaults within it)."""
    chosen = [o for o in preset["methods"][method] if o.startswith("strategy=")] if method else []
    return OmegaConf.to_container(compose(chosen), resolve=True)


def cells(preset: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Seed-major order: a partly run grid already holds a whole table for the first seeds."""
    return [
        (target, method, seed)
        for seed in preset["seeds"]
        for target in preset["targets"]
        for method in preset["methods"]
    ]


def check(preset: dict[str, Any]) -> None:
    """Compose and validate every cell before anything runs."""
    for target, method, seed in cells(preset):
        validate(compose(cell_overrides(preset, target, method, seed)))


def settings_line(preset: dict[str, Any]) -> str:
    """The preset in words, for the results file."""
    cfg = compose(cell_overrides(preset, preset["targets"][0], next(iter(preset["methods"])), 0))
    return (
        f"engine {preset['engine']}, {len(preset['targets'])} targets x "
        f"{len(preset['methods'])} methods x seeds {preset['seeds']}; {cfg.rounds} rounds of "
        f"{cfg.train.local_steps} local steps (batch {cfg.train.batch_size}, "
        f"{cfg.train.optimizer} lr {cfg.train.lr}); silos {list(cfg.data.domains)}; "
        f"grid overrides {preset['overrides']}; methods {preset['methods']}"
        + (f"; per target {preset['per_target']}" if preset.get("per_target") else "")
    )


def use_free_ports(cfg: Any) -> None:
    """Cells run for hours next to other work: give each federation ports nobody holds."""
    from server.processes import free_port, port_in_use

    host = cfg.federation.host
    cfg.federation.control_port = free_port(host)
    if cfg.federation.mode == "deployment":
        cfg.federation.fleet_port = free_port(host)
        base = free_port(host)
        while any(port_in_use(host, base + i) for i in range(len(silos(cfg)))):
            base = free_port(host)
        cfg.federation.supernode_ports_from = base


def run_cell(
    preset: dict[str, Any], root: Path, cell: tuple[str, str, int], workers: int = 1
) -> dict[str, Any]:
    """Run one cell from scratch into its folder (``workers`` cells run at once); returns its
    summary and seconds (raises FedalignError when the run cannot be done)."""
    from server.inprocess import run_in_process
    from server.launcher import launch

    path = cell_dir(root, preset["name"], *cell)
    shutil.rmtree(path, ignore_errors=True)  # an interrupted or failed earlier try
    cfg = compose(cell_overrides(preset, *cell))
    start = time.perf_counter()
    if preset["engine"] == "in-process":
        # the cell's own records hold what Flower's per-phase INFO lines would say
        logging.getLogger("flwr").setLevel(logging.WARNING)
        summary = run_in_process(cfg, path, threads=int(cfg.federation.threads_per_silo))
    else:
        use_free_ports(cfg)
        summary = launch(cfg, path, echo=lambda *_: None)
    seconds = time.perf_counter() - start
    clock = {"seconds": round(seconds, 2), "engine": preset["engine"], "workers": workers}
    atomic.write_text(path / "cell.json", json.dumps(clock))
    return {"summary": summary, "seconds": seconds}


def _run_cell_safely(
    preset: dict[str, Any], root: Path, cell: tuple[str, str, int], workers: int
) -> Any:
    """In a worker process: the cell's result, or the one-line error that stopped it."""
    try:
        return run_cell(preset, root, cell, workers)
    except FedalignError as exc:
        return str(exc)


def default_workers(preset: dict[str, Any]) -> int:
    """In-process cells run side by side, one per core (each silo uses one torch thread);
    the simulation and the deployment use the whole machine for one cell."""
    return (os.cpu_count() or 1) if preset["engine"] == "in-process" else 1


def run_grid(
    preset: dict[str, Any], root: Path, echo: Any = print, workers: int | None = None
) -> dict[str, int]:
    """Run every unfinished cell; returns counts of done, skipped and failed cells.

    Parameters
    ----------
    preset : dict
        A preset from :func:`load_preset`.
    root : Path
        Where the cells' run folders go.
    echo : callable
        Prints a line for the user.
    workers : int, optional
        Cells run at once (in-process engine only; default: one per core).
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    workers = default_workers(preset) if workers is None else workers
    if workers < 1 or (workers > 1 and preset["engine"] != "in-process"):
        raise ConfigError(
            f"grid: --workers {workers}: more than one applies to engine in-process only"
        )
    check(preset)
    todo, stale = [], 0
    defaults = {method: default_config(preset, method) for method in preset["methods"]}
    for cell in cells(preset):
        path = cell_dir(root, preset["name"], *cell)
        if not is_complete(path, expected_config(preset, *cell), defaults[cell[1]]):
            todo.append(cell)
            stale += is_complete(path)
    counts = {"done": 0, "skipped": len(cells(preset)) - len(todo), "failed": 0}
    echo(
        f"grid {preset['name']}: {len(todo)} cells to run ({stale} of them finished with other "
        f"settings), {counts['skipped']} already done"
        + (f", {workers} at a time" if workers > 1 and todo else "")
    )
    if todo:
        ensure_data(compose(cell_overrides(preset, *todo[0])), echo)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )

    def report(cell: tuple[str, str, int], result: Any) -> None:
        name = "{} {} seed{}".format(*cell)
        if isinstance(result, str):
            counts["failed"] += 1
            progress.console.print(f"{name}: FAILED: {result}")
        else:
            counts["done"] += 1
            summary = result["summary"]
            last = min(5, summary["rounds_completed"])
            over = f"mean of the last {last} rounds" if last > 1 else "its one round"
            progress.console.print(
                f"{name}: target accuracy {100 * summary['mean_last5_target_accuracy']:.1f}% "
                f"({over}), {result['seconds']:.0f} s"
            )
        progress.advance(task)

    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"grid {preset['name']}", total=len(todo))
        if workers == 1:
            for cell in todo:
                progress.update(task, description="{} {} seed{}".format(*cell))
                report(cell, _run_cell_safely(preset, root, cell, 1))
        else:
            # spawn: a fresh interpreter per worker (no forked torch or Flower state)
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_run_cell_safely, preset, root, c, workers): c for c in todo}
                for future in as_completed(futures):
                    report(futures[future], future.result())
    return counts
