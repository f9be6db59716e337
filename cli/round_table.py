"""The table a finished run prints: the target's and every silo's accuracy, round by round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedalign.runlog import MAX_SILO_LINES, mean_and_range, source_accuracies


def print_results(run_dir: Path, console: Any) -> None:
    """Print the run's rounds (from ``metrics.jsonl``) and its summary line.

    Parameters
    ----------
    run_dir : Path
        A run folder with ``metrics.jsonl`` and ``summary.json``.
    console : rich.console.Console
        Where the table goes.
    """
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
