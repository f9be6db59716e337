"""Orchestration overhead: a round on the real gRPC deployment vs the same work in one process.

Runs, one after the other in this invocation, the default benchmark (Digits-5, target mnistm,
digit CNN, 60 local steps) for ``--rounds`` rounds as:

* ``deployed``: ``fedalign run`` on this machine (SuperLink, one SuperNode per silo, a fresh
  ClientApp process per message that hands the message to the silo's warm runtime), with
  fedalign's settings;
* ``cold``: the same without silo runtimes (``federation.silo_runtime=false``): each fresh
  ClientApp process imports torch, loads the data and does the work itself, as before issue #15;
* ``earlier-polling``: the same, with fedalign's polling before issue #9 (grid pulls after 0.1 s
  doubling to 1 s, executors poll every 1 s);
* ``flower-polling``: the same, with Flower's own polling (grid pulls every 3 s, executors poll
  for tasks every 1 s);
* ``flower-stock``: Flower's stock FedAvg pattern (a train phase and an evaluate phase per
  round, ``strategy=fedavg_stock``) with Flower's own polling;
* ``in-process``: the same ServerApp logic and ClientApps in this process
  (``server/inprocess.py``): no SuperLink, SuperNode, serialisation or process start. Silos
  run one after another with the deployment's torch threads per silo
  (``federation.threads_per_silo``); the deployment runs them side by side on the cores;

for FedAvg and FedKA. A round's wall time is the mean over rounds 1..R-1 of metrics.jsonl's
``wall_seconds`` (round R also holds the final evaluation; FedKA's round 0 its first
embedding). Prints seconds per round and per message phase, and deployed / in-process.

Usage: ``python bench/bench_overhead.py --rounds 5 --out docs/perf/overhead.json``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from procmem import Sampler  # bench/ is on sys.path when run as a script

from fedalign.config import compose, validate

THRESHOLDS = (0.6, 0.7, 0.75, 0.8)  # target accuracies for the time-to-accuracy table
PHASES = {"fedavg": 1, "fedavg_stock": 2, "fedka": 2}  # message phases per round
FLOWER_POLLING = [
    "federation.reply_poll_min=3",
    "federation.reply_poll_max=3",
    "federation.superexec_poll=null",
]
EARLIER_POLLING = [  # fedalign before issue #9: grid pulls 0.1 s doubling to 1 s, Flower's 1 s
    "federation.reply_poll_min=0.1",
    "federation.reply_poll_max=1",
    "federation.superexec_poll=null",
]
VARIANTS = {  # name -> (strategy for "fedavg", extra overrides, deployed?)
    "deployed": (None, [], True),
    "cold": (None, ["federation.silo_runtime=false"], True),
    "earlier-polling": (None, EARLIER_POLLING, True),
    "flower-polling": (None, FLOWER_POLLING, True),
    "flower-stock": ("fedavg_stock", FLOWER_POLLING, True),
    "in-process": (None, [], False),
}


def round_seconds(run_dir: Path) -> list[float]:
    """``wall_seconds`` of rounds 1..R-1 of a finished run."""
    lines = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(line["round"] for line in lines)
    return [line["wall_seconds"] for line in lines if 0 < line["round"] < last]


def start_and_work(metrics: dict[str, float]) -> tuple[float, float]:
    """A reply's ClientApp start-up (process start to handler, plus importing torch in the
    handler) and its work (the rest of the handler)."""
    imported = metrics.get("import-seconds", 0.0)
    return metrics.get("start-seconds", 0.0) + imported, metrics["handler-seconds"] - imported


def critical_path(run_dir: Path, target: str) -> dict[str, float]:
    """Mean over rounds 1..R-1 of the silos' part of a round: the slowest source's ClientApp
    start-up and work (client/runtime.py ``timed``), plus for FedKA the target's vote phase;
    the rest of the round's wall time is Flower's transport and polling."""
    lines = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(line["round"] for line in lines)
    start, work, rest = [], [], []
    for line in lines:
        if not 0 < line["round"] < last:
            continue
        sources = [m for d, m in line["silos"].items() if d != target and "train-loss" in m]
        slowest = max(sources, key=lambda m: m.get("start-seconds", 0) + m["handler-seconds"])
        s, w = start_and_work(slowest)
        voter = line["silos"].get(target, {})
        if "vote-seconds" in voter:  # FedKA's phase B: the target silo's own process
            vs, vw = start_and_work(voter)
            s, w = s + vs, w + vw
        start.append(s)
        work.append(w)
        rest.append(line["wall_seconds"] - s - w)
    return {
        "start_seconds": statistics.mean(start),
        "work_seconds": statistics.mean(work),
        "flower_seconds": statistics.mean(rest),
    }


def time_to_accuracy(run_dir: Path) -> dict[str, float | None]:
    """Seconds from the ServerApp's start until the target accuracy first reaches each
    threshold (None: not within the run)."""
    lines = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reached: dict[str, float | None] = {}
    for threshold in THRESHOLDS:
        times = [
            line["elapsed_seconds"]
            for line in lines
            if line["target_accuracy"] is not None and line["target_accuracy"] >= threshold
        ]
        reached[f"{threshold:.2f}"] = min(times) if times else None
    return reached


def run_variant(
    strategy: str, variant: str, rounds: int, root: Path, steps: int | None = None
) -> dict[str, Any]:
    """One run; returns its round times and the whole command's wall time."""
    from server.experiments import use_free_ports
    from server.inprocess import run_in_process
    from server.launcher import launch

    replace, extra, deployed = VARIANTS[variant]
    if strategy != "fedavg" and replace is not None:
        return {}
    name = replace or strategy
    base = [f"strategy={name}", f"rounds={rounds}", "wandb.mode=disabled", f"name=bench-{name}"]
    if steps is not None:
        base.append(f"train.local_steps={steps}")
    cfg = compose([*base, *extra])
    validate(cfg)
    run_dir = root / f"{strategy}-{variant}"
    start = time.perf_counter()
    memory = None
    if deployed:
        use_free_ports(cfg)
        memory = Sampler(os.getpid(), every=1.0, min_free=0)
        memory.start()
        try:
            summary = launch(cfg, run_dir, echo=lambda *_: None)
        finally:
            memory.done.set()
            memory.join()
    else:
        summary = run_in_process(cfg, run_dir, threads=int(cfg.federation.threads_per_silo))
    total = time.perf_counter() - start
    seconds = round_seconds(run_dir)
    result = {
        "strategy": name,
        "local_steps": int(cfg.train.local_steps),
        "variant": variant,
        "round_seconds": seconds,
        "mean_round_seconds": statistics.mean(seconds),
        "phases_per_round": PHASES[name],
        "command_seconds": total,
        "final_target_accuracy": summary["final_target_accuracy"],
        "time_to_accuracy": time_to_accuracy(run_dir),
    }
    if memory is not None:  # the largest process of each kind (PSS), e.g. a silo's runtime
        result["peak_mib_by_kind"] = {
            kind: round(size / 2**20) for kind, size in sorted(memory.peak_by_kind.items())
        }
    if deployed and name != "fedavg_stock":  # silos run side by side: the slowest one counts
        result["critical_path"] = critical_path(run_dir, str(cfg.data.target))
    result["seconds_per_phase"] = result["mean_round_seconds"] / result["phases_per_round"]
    print(
        f"{strategy:<7} {variant:<15} round {result['mean_round_seconds']:6.2f} s "
        f"({result['phases_per_round']} phases, {result['seconds_per_phase']:5.2f} s each), "
        f"whole command {total:6.1f} s, final target acc {summary['final_target_accuracy']:.3f}",
        flush=True,
    )
    if parts := result.get("critical_path"):
        print(
            f"        of a round: ClientApp start-up {parts['start_seconds']:5.2f} s, silo work "
            f"{parts['work_seconds']:5.2f} s, Flower transport and polling "
            f"{parts['flower_seconds']:5.2f} s (slowest silo per phase)",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedka"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="local steps per round (default: the config's)")
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (rounds 1..R-1 are measured)")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedalign-bench-") as tmp:
        for strategy in args.strategies:
            for variant in args.variants:
                if result := run_variant(strategy, variant, args.rounds, Path(tmp), args.steps):
                    results.append(result)
    by = {(r["strategy"], r["variant"]): r for r in results}
    print("\nratios (mean round wall time, measured above):")
    for strategy in args.strategies:
        base = by.get((strategy, "in-process"))
        for (name, variant), result in by.items():
            if variant == "in-process" or base is None:
                continue
            if name == strategy or (strategy == "fedavg" and name == "fedavg_stock"):
                ratio = result["mean_round_seconds"] / base["mean_round_seconds"]
                result["overhead_ratio"] = ratio
                print(f"  {name:<13} {variant:<15} / in-process: {ratio:5.2f}  (goal <= 1.10)")
    if ("fedavg", "deployed") in by and ("fedka", "deployed") in by:
        print("\ntime to target accuracy on the deployment (s from the ServerApp's start):")
        avg, ka = by["fedavg", "deployed"], by["fedka", "deployed"]
        for key in avg["time_to_accuracy"]:
            a, k = avg["time_to_accuracy"][key], ka["time_to_accuracy"][key]
            ratio = f"{k / a:.2f}" if a and k else "-"
            print(f"  >= {key}: FedAvg {a or 'not reached'}, FedKA {k or 'not reached'}, "
                  f"FedKA/FedAvg {ratio}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "cpus": os.cpu_count(),
            "rounds": args.rounds,
            "local_steps": args.steps or int(compose([]).train.local_steps),
            "time": time.ctime(),
        }
        args.out.write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
