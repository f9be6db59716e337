"""The run folder: resolved config, per-round metrics, summary, plot, and W&B mirror.

Layout of ``<run_dir>``:
- ``config.yaml``: the resolved config of the run.
- ``metrics.jsonl``: one JSON line per round r (the global model after r rounds; r = 0 is the
  initial model): wall seconds, target accuracy (and with ``tta.methods`` the target accuracy
  after each test-time adaptation, ``target_accuracy_<method>``), per-silo metrics, bytes sent
  and received.
- ``summary.json``: status, final / best / mean-of-last-5 target accuracy, totals. The rounds
  are 1..R, never the initial model of round 0: with fewer than 5 rounds the mean is over all
  of them, and a one-round run's (``strategy=oneshot``: the merge) is its round 1 accuracy.
- ``accuracy.png``: target and per-silo test accuracy per round.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedalign import atomic
from fedalign.settings.tta import METHODS as TTA_METHODS
from fedalign.settings.tta import line_key, metric_key

log = logging.getLogger("fedalign.run")

# Round-level diagnostics drawn next to the accuracies when a strategy reports them.
DIAGNOSTICS = (
    "mmd",
    "domain_loss",
    "domain_accuracy",
    "class_align_loss",
    "vote_agreement",
    "vote_kept_fraction",
    "pseudo_label_accuracy",
    "group_effect",
)
PLOT_EVERY = 30.0  # seconds: accuracy.png is redrawn at most this often, and at the end
MAX_SILO_LINES = 12  # more silos than this (data.shards): the sources are drawn as mean and range


def source_accuracies(line: dict[str, Any], sources: list[str]) -> list[float]:
    """The own test accuracy of each of ``sources`` that reported one in a metrics line."""
    return [
        line["silos"][d]["test-accuracy"]
        for d in sources
        if "test-accuracy" in line["silos"].get(d, {})
    ]


def configured_silos(config: dict[str, Any]) -> list[str]:
    """The silo names a resolved config sets up (``fedalign.config.silos``), or none when it
    has no ``data`` section (a recorder made by a unit test)."""
    from fedalign.config import silos

    return [silo.domain for silo in silos(config)] if "data" in config else []


def mean_and_range(values: list[float]) -> tuple[float, float, float]:
    """Mean, minimum and maximum of a non-empty list (many silos shown as one band)."""
    return sum(values) / len(values), min(values), max(values)


class RunRecorder:
    """Collects per-round metrics as replies arrive and writes them to the run folder.

    Parameters
    ----------
    run_dir : Path
        The run folder (created if missing).
    config : dict
        The resolved config (written to ``config.yaml``, sent to W&B).
    target : str
        The target domain: its silo's test accuracy is the headline metric.
    tracker : object, optional
        Anything with ``log(dict, step=int)`` and ``finish()`` (a W&B run), or None.
    state : dict, optional
        A checkpoint's ``state()``: continue that record instead of starting an empty one.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        target: str,
        tracker: Any = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.target = target
        self.tracker = tracker
        self.silos: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
        self.round_info: dict[int, dict[str, float]] = defaultdict(dict)
        self.round_metrics: dict[int, dict[str, float]] = defaultdict(dict)
        self.lines: list[dict[str, Any]] = []
        self.configured = configured_silos(config)
        self.start = time.perf_counter()
        self._plotted = self.start
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        atomic.write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(config))
        if state is not None:
            self.restore(state)
        else:
            (self.run_dir / "metrics.jsonl").write_text("")

    def silo(self, rnd: int, domain: str, metrics: dict[str, float]) -> None:
        """Add metrics reported by silo ``domain`` about the model of round ``rnd``."""
        self.silos[rnd].setdefault(domain, {}).update(metrics)

    def info(self, rnd: int, **values: float) -> None:
        """Add round-level values (wall seconds, bytes) for round ``rnd``; numbers add up."""
        for key, value in values.items():
            self.round_info[rnd][key] = self.round_info[rnd].get(key, 0) + value

    def metrics(self, rnd: int, **values: float) -> None:
        """Set round-level metrics of round ``rnd`` (e.g. mmd, vote_agreement, group_effect)."""
        self.round_metrics[rnd].update(values)

    def complete(self, rnd: int) -> dict[str, Any]:
        """Write round ``rnd``'s line to metrics.jsonl, refresh the plot, log to W&B."""
        silos = self.silos.get(rnd, {})
        target = silos.get(self.target, {})
        line = {
            "round": rnd,
            "elapsed_seconds": round(time.perf_counter() - self.start, 3),
            "wall_seconds": round(self.round_info[rnd].get("wall_seconds", 0.0), 3),
            "target": self.target,
            "target_accuracy": target.get("test-accuracy"),
            "target_loss": target.get("test-loss"),
            **{line_key(m): target[metric_key(m)] for m in TTA_METHODS if metric_key(m) in target},
            "bytes_sent": int(self.round_info[rnd].get("bytes_sent", 0)),
            "bytes_received": int(self.round_info[rnd].get("bytes_received", 0)),
            **self.round_metrics.get(rnd, {}),
            "silos": silos,
        }
        self.lines.append(line)
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        if time.perf_counter() - self._plotted >= PLOT_EVERY:  # off the round's critical path
            self.plot()
        if self.tracker is not None:
            self.tracker.log(_flat_for_tracker(line), step=rnd)
        acc = line["target_accuracy"]
        others = {
            d: m["test-accuracy"]
            for d, m in silos.items()
            if d != self.target and "test-accuracy" in m
        }
        if len(others) <= MAX_SILO_LINES:
            detail = ", ".join(f"{d} {a:.3f}" for d, a in sorted(others.items()))
        else:
            mean, low, high = mean_and_range(list(others.values()))
            detail = f"{len(others)} sources: mean {mean:.3f}, range {low:.3f}-{high:.3f}"
        log.info(
            "round %d: target %s accuracy %s | %s",
            rnd,
            self.target,
            "n/a" if acc is None else f"{acc:.4f}",
            detail,
        )
        return line

    def _plot_source_range(self, ax: Any, sources: list[str]) -> None:
        """Mean and min-max band of the sources' own test accuracy, per round."""
        rows = [
            (line["round"], *mean_and_range(accs))
            for line in self.lines
            if (accs := source_accuracies(line, sources))
        ]
        if rows:
            rounds, mean, low, high = zip(*rows, strict=True)
            ax.fill_between(rounds, low, high, alpha=0.2, label=f"{len(sources)} sources: range")
            ax.plot(rounds, mean, marker="o", lw=1.0, label=f"{len(sources)} sources: mean")

    def plot(self) -> Path:
        """Write ``accuracy.png``: target accuracy (bold) and each silo's own test accuracy."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        extras = [k for k in DIAGNOSTICS if any(line.get(k) is not None for line in self.lines)]
        fig, axes = plt.subplots(
            1, 2 if extras else 1, figsize=(12 if extras else 7, 4), dpi=110, squeeze=False
        )
        ax = axes[0][0]
        domains = sorted({d for line in self.lines for d in line["silos"]})
        if len(domains) > MAX_SILO_LINES:
            self._plot_source_range(ax, [d for d in domains if d != self.target])
            domains = [self.target]
        for domain in domains:
            points = [
                (line["round"], line["silos"][domain]["test-accuracy"])
                for line in self.lines
                if "test-accuracy" in line["silos"].get(domain, {})
            ]
            if not points:
                continue
            rounds, accs = zip(*points, strict=True)
            is_target = domain == self.target
            ax.plot(
                rounds,
                accs,
                marker="o",
                lw=2.5 if is_target else 1.0,
                alpha=1.0 if is_target else 0.6,
                label=f"{domain} (target)" if is_target else domain,
            )
        ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=self.run_dir.name)
        for key in extras:
            points = [
                (line["round"], line[key]) for line in self.lines if line.get(key) is not None
            ]
            rounds, values = zip(*points, strict=True)
            axes[0][1].plot(rounds, values, marker=".", label=key)
        if extras:
            axes[0][1].set(xlabel="round", title="alignment and vote diagnostics")
        for axis in axes[0]:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8, loc="best")
        out = self.run_dir / "accuracy.png"
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        atomic.write_bytes(out, buffer.getvalue())
        self._plotted = time.perf_counter()
        return out

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this record after a restart (JSON-able)."""
        return {
            "silos": {str(r): v for r, v in self.silos.items()},
            "round_info": {str(r): v for r, v in self.round_info.items()},
            "round_metrics": {str(r): v for r, v in self.round_metrics.items()},
            "lines": self.lines,
            "elapsed": time.perf_counter() - self.start,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``; metrics.jsonl is rewritten to the checkpoint's lines
        (a line written after the checkpoint will be written again by the resumed run)."""
        for name in ("silos", "round_info", "round_metrics"):
            setattr(self, name, defaultdict(dict, {int(r): v for r, v in state[name].items()}))
        self.lines = list(state["lines"])
        self.start = time.perf_counter() - float(state["elapsed"])
        atomic.write_text(
            self.run_dir / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in self.lines)
        )

    def not_finished(self, last: dict[str, Any]) -> list[str]:
        """The configured silos with no test accuracy in ``last``, the last metrics line: they
        did not evaluate the final model (one dropped from the last round's training that
        evaluated it all the same has finished)."""
        known = self.configured or sorted({d for line in self.lines for d in line["silos"]})
        return sorted(d for d in known if "test-accuracy" not in last.get("silos", {}).get(d, {}))

    def finish(self, status: str, error: str | None = None, **extra: Any) -> dict[str, Any]:
        """Write ``summary.json`` and ``accuracy.png`` (also on failure), close the tracker."""
        if self.lines:
            self.plot()
        # Rounds 1..R: the initial model (round 0) counts in none of the headline numbers.
        accs = [(row["round"], row["target_accuracy"]) for row in self.lines if row["round"] > 0]
        accs = [(r, a) for r, a in accs if a is not None]
        last5 = [a for _, a in accs[-5:]]
        best = max(accs, key=lambda ra: ra[1]) if accs else (None, None)
        initial = next((row["target_accuracy"] for row in self.lines if row["round"] == 0), None)
        last = self.lines[-1] if self.lines else {}
        summary = {
            "status": status,
            "error": error,
            "target": self.target,
            "rounds_completed": accs[-1][0] if accs else 0,
            "initial_target_accuracy": initial,
            "final_target_accuracy": accs[-1][1] if accs else None,
            "best_target_accuracy": best[1],
            "best_round": best[0],
            "mean_last5_target_accuracy": sum(last5) / len(last5) if last5 else None,
            "final_silo_accuracy": {
                d: m.get("test-accuracy")
                for d, m in (self.lines[-1]["silos"] if self.lines else {}).items()
            },
            "silos_not_finished": self.not_finished(last),
            "wall_seconds": round(time.perf_counter() - self.start, 3),
            "bytes_sent": sum(row["bytes_sent"] for row in self.lines),
            "bytes_received": sum(row["bytes_received"] for row in self.lines),
            **extra,
        }
        atomic.write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.tracker is not None:
            self.tracker.summary.update({k: v for k, v in summary.items() if v is not None})
            self.tracker.finish(exit_code=0 if status == "completed" else 1)
        return summary


def mark_summary(run_dir: Path, status: str, error: str | None) -> None:
    """Set ``status`` and ``error`` of the run's summary.json (written if missing): the
    launcher knows better than the ServerApp why a run ended (a crash, Ctrl-C)."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(status=status, error=error)
    atomic.write_text(path, json.dumps(summary, indent=2) + "\n")


def _flat_for_tracker(line: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The round's numbers for W&B, nested ones (each silo's metrics, FedDG-GA's weights and
    gaps per source) under ``outer/inner`` names; ``silos`` is named ``silo``."""
    flat: dict[str, float] = {}
    for key, value in line.items():
        if key == "round" and not prefix:
            continue
        name = prefix + ("silo" if key == "silos" and not prefix else str(key))
        if isinstance(value, dict):
            flat.update(_flat_for_tracker(value, name + "/"))
        elif isinstance(value, int | float):
            flat[name] = value
    return flat
