"""The results table: read a grid's run folders, write Markdown, CSV and a plot (Flower-free).

A grid's cells live in ``<root>/<preset>/<target>/<method>/seed<k>/`` (run folders). The
headline per cell is the target accuracy averaged over the last 5 rounds (of rounds 1..R; for a
one-round run, ``strategy=oneshot``, the merge's accuracy: summary.json's
``mean_last5_target_accuracy``, ``fedalign/runlog.py``); best-round accuracy is reported next
to it (optimistic: it picks a round by the target's test labels). A cell run with test-time
adaptation (``tta.methods``) also gives a "METHOD + LAME" / "METHOD + AdaBN" row per method
whose accuracy its metrics carry (the same run: same cost, adapted accuracies).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedalign import atomic
from fedalign.config import learning_config
from fedalign.settings.tta import LABELS as TTA_LABELS
from fedalign.settings.tta import METHODS as TTA_METHODS
from fedalign.settings.tta import line_key

COLUMNS = (
    "target",
    "method",
    "seed",
    "last5_accuracy",
    "final_accuracy",
    "best_accuracy",
    "best_round",
    "rounds",
    "wall_seconds",  # the whole run: federation start-up, rounds and teardown
    "mb_sent_per_round",
    "mb_received_per_round",
    "seconds_per_round",  # the rounds alone (metrics.jsonl's wall_seconds of rounds 1..R)
    "group_effect",  # FedKA-style runs: last-5 mean of averaged model minus mean source model
    "engine",  # how the cell ran (its seconds compare only within one engine)
)


def cell_dir(root: Path, preset: str, target: str, method: str, seed: int) -> Path:
    return root / preset / target / method / f"seed{seed}"


def without_disabled(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the blocks whose ``enabled`` is false, at any depth: a block that is
    off learns like a config that never had it."""
    return {
        k: without_disabled(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if not (isinstance(v, dict) and v.get("enabled") is False)
    }


def same_settings(ran: dict[str, Any], expected: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Did a run with config ``ran`` learn with the settings ``expected``? A key missing from
    ``ran`` was added to the config after it ran: it matches when ``expected`` keeps that key's
    default (a new setting's default keeps the behaviour from before it existed). A block that is
    off (``enabled: false``) compares as absent."""
    ran, expected, defaults = (without_disabled(c) for c in (ran, expected, defaults))
    for key in ran.keys() | expected.keys():
        want = expected.get(key)
        if key not in ran:
            if want != defaults.get(key):
                return False
        elif isinstance(want, dict) and isinstance(ran[key], dict):
            if not same_settings(ran[key], want, defaults.get(key) or {}):
                return False
        elif ran[key] != want:
            return False
    return True


def is_complete(
    path: Path, expected: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> bool:
    """A cell is done when its summary.json says ``completed`` and, given the config the grid
    would run it with now (``expected``; ``defaults`` is the config with no overrides), its own
    config.yaml learned with the same settings: a cell run before a preset or default changed
    is stale and runs again."""
    try:
        if json.loads((path / "summary.json").read_text()).get("status") != "completed":
            return False
        if expected is None:
            return True
        from omegaconf import OmegaConf

        ran = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
    except (OSError, ValueError):
        return False
    return same_settings(learning_config(ran), learning_config(expected), defaults or {})


def engine_label(clock: dict[str, Any]) -> str:
    """How a cell ran, from its cell.json (cells from before the key: the simulation, which
    ran every one of them)."""
    engine = str(clock.get("engine", "simulation"))
    workers = int(clock.get("workers", 1))
    return engine + (f", {workers} at once" if workers > 1 else "")


def tta_label(method: str, tta: str) -> str:
    """The results table's name of ``method`` with test-time adaptation ``tta``."""
    return f"{method} + {TTA_LABELS[tta]}"


def tta_rows(row: dict[str, Any], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "METHOD + LAME" / "METHOD + AdaBN" rows of a cell whose metrics.jsonl carries the
    target accuracy after that adaptation: ``row`` (the plain row) with the adapted accuracies,
    each over rounds 1..R as the summary takes the plain one (last 5, final, best)."""
    rows = []
    for tta in TTA_METHODS:
        accs = [
            (line["round"], line[line_key(tta)])
            for line in lines
            if line["round"] >= 1 and line.get(line_key(tta)) is not None
        ]
        if not accs:
            continue
        best = max(accs, key=lambda ra: ra[1])
        rows.append(
            {
                **row,
                "method": tta_label(row["method"], tta),
                "last5_accuracy": statistics.fmean(a for _, a in accs[-5:]),
                "final_accuracy": accs[-1][1],
                "best_accuracy": best[1],
                "best_round": best[0],
            }
        )
    return rows


def cell_rows(path: Path, target: str, method: str, seed: int) -> list[dict[str, Any]]:
    """A completed cell's CSV rows: the plain row, then one per test-time adaptation."""
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    row = cell_row(path, target, method, seed, lines)
    return [row, *tta_rows(row, lines)]


def cell_row(
    path: Path, target: str, method: str, seed: int, lines: list[dict[str, Any]]
) -> dict[str, Any]:
    """One CSV row from a completed cell's summary.json and its metrics.jsonl ``lines``."""
    summary = json.loads((path / "summary.json").read_text())
    rounds = max(summary["rounds_completed"], 1)
    cell = path / "cell.json"  # the harness's own clock: process start-up included
    clock = json.loads(cell.read_text()) if cell.exists() else {}
    seconds = clock.get("seconds", summary["wall_seconds"])
    rounds_only = [line for line in lines if line["round"] >= 1]
    effects = [line["group_effect"] for line in rounds_only if "group_effect" in line][-5:]
    return {
        "target": target,
        "method": method,
        "seed": seed,
        "last5_accuracy": summary["mean_last5_target_accuracy"],
        "final_accuracy": summary["final_target_accuracy"],
        "best_accuracy": summary["best_target_accuracy"],
        "best_round": summary["best_round"],
        "rounds": summary["rounds_completed"],
        "wall_seconds": seconds,
        "mb_sent_per_round": sum(line["bytes_sent"] for line in lines) / rounds / 1e6,
        "mb_received_per_round": sum(line["bytes_received"] for line in lines) / rounds / 1e6,
        "seconds_per_round": (
            statistics.fmean(line["wall_seconds"] for line in rounds_only) if rounds_only else None
        ),
        "group_effect": statistics.fmean(effects) if effects else None,
        "engine": engine_label(clock),
    }


Expected = Callable[[str, str, int], dict[str, Any]]
Defaults = Callable[[str], dict[str, Any]]


def collect(
    preset: dict[str, Any], root: Path, expected: Expected, defaults: Defaults
) -> list[dict[str, Any]]:
    """Rows of every completed, current cell of ``preset`` under ``root``, in grid order;
    ``expected(target, method, seed)`` is the config the grid would run that cell with now,
    ``defaults(method)`` the config with only the method's strategy chosen (see
    :func:`is_complete`)."""
    return [
        row
        for target in preset["targets"]
        for method in preset["methods"]
        for seed in preset["seeds"]
        if is_complete(
            path := cell_dir(root, preset["name"], target, method, seed),
            expected(target, method, seed),
            defaults(method),
        )
        for row in cell_rows(path, target, method, seed)
    ]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table_methods(rows: list[dict[str, Any]], preset: dict[str, Any]) -> list[str]:
    """The preset's methods, each followed by its test-time adaptation rows that ``rows`` have."""
    present = {r["method"] for r in rows}
    return [
        name
        for method in preset["methods"]
        for name in (method, *(tta_label(method, tta) for tta in TTA_METHODS))
        if name == method or name in present
    ]


def accuracy_table(rows: list[dict[str, Any]], preset: dict[str, Any], key: str) -> str:
    """Methods (with their "+ LAME" / "+ AdaBN" rows where ``rows`` have them) x targets
    (+ average) of ``key``, mean ± std over seeds."""
    targets, methods = list(preset["targets"]), table_methods(rows, preset)
    lines = [
        "| method | " + " | ".join(targets) + " | average |",
        "|---" * (len(targets) + 2) + "|",
    ]
    for method in methods:
        cells = []
        for target in targets:
            cells.append(
                _mean_std([r[key] for r in rows if r["method"] == method and r["target"] == target])
            )
        per_seed = []  # the average over targets, per seed, where every target finished
        for seed in preset["seeds"]:
            values = [r[key] for r in rows if r["method"] == method and r["seed"] == seed]
            if len(values) == len(targets):
                per_seed.append(statistics.fmean(values))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_mean_std(per_seed)} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict[str, Any]], preset: dict[str, Any]) -> str:
    """One row per method of ``preset["ablation"]`` (method -> which blocks are on): the
    last-5 accuracy averaged over targets (mean ± std over seeds whose every target finished),
    the Group Effect averaged over all its cells, and its cost per round."""
    lines = [
        "| method | blocks | average over targets | Group Effect (points) | seconds per round | "
        "MB per round (both ways) |",
        "|---|---|---|---|---|---|",
    ]
    for method, blocks in preset["ablation"].items():
        mine = [r for r in rows if r["method"] == method]
        per_seed = seed_averages(rows, preset, method)
        effects = [r["group_effect"] for r in mine if r["group_effect"] is not None]
        effect = f"{100 * statistics.fmean(effects):+.1f}" if effects else "—"
        by_engine: dict[str, list[float]] = {}
        for r in mine:
            if r["seconds_per_round"] is not None:
                by_engine.setdefault(r.get("engine", "simulation"), []).append(
                    r["seconds_per_round"]
                )
        # the target's test-time adaptation runs in its evaluations, inside the rounds' seconds
        adapted = {tta_label(method, tta) for tta in TTA_METHODS}
        adapts = any(r["method"] in adapted for r in rows)
        cost = (
            "; ".join(
                f"{statistics.fmean(values):.1f} ({engine}{', with TTA' if adapts else ''})"
                for engine, values in sorted(by_engine.items())
            )
            or "—"
        )
        both = [r["mb_sent_per_round"] + r["mb_received_per_round"] for r in mine]
        mb = f"{statistics.fmean(both):.2f}" if both else "—"
        lines.append(f"| {method} | {blocks} | {_mean_std(per_seed)} | {effect} | {cost} | {mb} |")
    return "\n".join(lines)


def cost_table(rows: list[dict[str, Any]], preset: dict[str, Any]) -> str:
    lines = [
        "| method | runs | wall seconds per run | MB per round, server → silos | "
        "MB per round, silos → server |",
        "|---|---|---|---|---|",
    ]
    for method in preset["methods"]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            lines.append(f"| {method} | 0 | — | — | — |")
            continue
        mean = {
            k: statistics.fmean(r[k] for r in mine)
            for k in ("wall_seconds", "mb_sent_per_round", "mb_received_per_round")
        }
        lines.append(
            f"| {method} | {len(mine)} | {mean['wall_seconds']:.0f} | "
            f"{mean['mb_sent_per_round']:.2f} | {mean['mb_received_per_round']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], preset: dict[str, Any], out: Path) -> None:
    """Grouped bars: mean-of-last-5 accuracy per target and method, std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, methods = list(preset["targets"]), list(preset["methods"])
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(targets) + 2), 4), dpi=110)
    for i, method in enumerate(methods):
        means, stds = [], []
        for target in targets:
            values = [
                r["last5_accuracy"] for r in rows if r["method"] == method and r["target"] == target
            ]
            means.append(statistics.fmean(values) if values else 0.0)
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(targets))]
        ax.bar(xs, means, width, yerr=stds, label=method, capsize=2)
    ax.set_xticks(range(len(targets)), targets)
    ax.set(ylabel="target accuracy (mean of last 5 rounds)", ylim=(0, 1), xlabel="unseen target")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(methods), 4))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic.write_bytes(out, buffer.getvalue())


def seed_averages(rows: list[dict[str, Any]], preset: dict[str, Any], method: str) -> list[float]:
    """The method's last-5 accuracy averaged over targets, one value per seed whose every
    target finished."""
    per_seed = []
    for seed in preset["seeds"]:
        values = [r["last5_accuracy"] for r in rows if r["method"] == method and r["seed"] == seed]
        if len(values) == len(preset["targets"]):
            per_seed.append(statistics.fmean(values))
    return per_seed


def goal_lines(rows: list[dict[str, Any]], preset: dict[str, Any]) -> str:
    """One line per goal of ``preset["goals"]`` (method -> {other: points}): the measured gain
    on the average over targets, and whether it reaches the goal."""
    lines = []
    for method, over in preset.get("goals", {}).items():
        mine = seed_averages(rows, preset, method)
        for other, points in over.items():
            theirs = seed_averages(rows, preset, other)
            if not mine or not theirs:
                lines.append(f"- {method} over {other}: goal +{points:g} points; not measured yet")
                continue
            gain = 100 * (statistics.fmean(mine) - statistics.fmean(theirs))
            verdict = "met" if gain >= points else "**not met**"
            lines.append(
                f"- {method} over {other}: {gain:+.1f} points; goal +{points:g}: {verdict}"
            )
    return "\n".join(lines)


def ablation_section(rows: list[dict[str, Any]], preset: dict[str, Any]) -> str:
    """The ablation table and its legend, when the preset names an ``ablation``."""
    if "ablation" not in preset:
        return ""
    return f"""Ablation: which of FedKA's blocks pay. The Group Effect is the averaged model's
target accuracy minus the mean of the source models' (last 5 rounds; only the methods that vote
evaluate the source models on the target). Cost: the rounds' wall seconds, by the engine the
cells ran in (seconds compare only within one engine: in-process cells run silos one after
another, side by side with another cell), and the bytes that cross the SuperLink, per round.

{ablation_table(rows, preset)}

"""


def goals_paragraph(rows: list[dict[str, Any]], preset: dict[str, Any]) -> str:
    """The goal lines and their legend, when the preset names ``goals``."""
    if "goals" not in preset:
        return ""
    return f"""Goals, on the average over targets (settings chosen on the validation federations,
docs/validation.md, which also says what was tried):

{goal_lines(rows, preset)}

"""


def write_results(
    preset: dict[str, Any],
    root: Path,
    docs: Path,
    settings: str,
    expected: Expected,
    defaults: Defaults,
) -> dict[str, Path]:
    """Regenerate ``docs/results.{md,csv,png}`` (preset ``full``; other presets
    ``docs/results-<preset>.*``) from the current cells' run folders under ``root``."""
    rows = collect(preset, root, expected, defaults)
    total = len(preset["targets"]) * len(preset["methods"]) * len(preset["seeds"])
    complete = len([row for row in rows if row["method"] in preset["methods"]])  # no TTA rows
    name = preset["name"]
    stem = "results" if name == "full" else f"results-{name}"
    paths = {ext: docs / f"{stem}.{ext}" for ext in ("md", "csv", "png")}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(paths["csv"], buffer.getvalue())
    plot(rows, preset, paths["png"])
    sections = ablation_section(rows, preset) + goals_paragraph(rows, preset)
    text = f"""# Results: target accuracy with each domain as the unseen target (preset `{name}`)

Generated by `fedalign results {name}` from the run folders in `{root}/{name}/`; do not edit by
hand. Cells complete: {complete}/{total}. Preset: {settings}.

Headline: target test accuracy averaged over the last 5 rounds of each run (a one-shot run has
one round: the merge's accuracy), mean ± std over seeds; "average" is the mean over targets
(only seeds whose every target finished).

{accuracy_table(rows, preset, "last5_accuracy")}

Best-round target accuracy (optimistic: the round is picked with the target's test labels, as
the FedKA notebook reports):

{accuracy_table(rows, preset, "best_accuracy")}

{sections}Cost per run (means over the finished cells):

{cost_table(rows, preset)}

![accuracy per target and method]({paths["png"].name})

Raw rows: [{paths["csv"].name}]({paths["csv"].name}).
"""
    atomic.write_text(paths["md"], text)
    return paths
