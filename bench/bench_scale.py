"""Scale: how many silos finish 3 rounds on this machine, their memory, and the round time.

Each step runs ``fedalign run`` (FedAvg, target mnistm) with ``data.shards=S``: each of the four
source domains is split among S silos (4*S sources + the target silo), in Flower's simulation
engine (``--engine simulation``: virtual SuperNodes in Ray) or as real processes
(``--engine deployment``: one ``flower-supernode`` per silo on loopback, each with its own
executor and a fresh ClientApp process per message). Silos do little learning (``--steps`` local
steps) so that the cost measured is the federation's, not the model's. On the deployment at most
``--max-in-flight`` silos work at once (``federation.max_in_flight``): every ClientApp process
holds torch, and 50 of them at once do not fit in 24 GiB.

While a step runs, a sampler reads every process of the federation from /proc: the proportional
set size (PSS: shared library pages divided among their users) per kind of process, the total,
and the machine's MemAvailable. A step is stopped (and the scan ends) when MemAvailable falls
below ``--min-free-gib``. Prints, per step: silos, mean round seconds, peak memory; writes JSON
and a plot of round time against silos.

Usage: ``python bench/bench_scale.py --engine simulation --silos 8 100 1000``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procmem import Sampler  # bench/ is on sys.path when run as a script

GIB = 2**30
MIB = 2**20


def overrides(engine: str, shards: int, args: argparse.Namespace) -> list[str]:
    from fedalign.config import compose
    from server.experiments import use_free_ports

    federation = "simulation" if engine == "simulation" else "local"
    chosen = [
        f"federation={federation}",
        f"data.shards={shards}",
        f"rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "train.keep_optimizer_state=false",
        "train.log_every=0",
        "wandb.mode=disabled",
        f"name=scale-{engine}-{shards}",
        "federation.connect_timeout=900",
        "federation.round_timeout=1800",
    ]
    if federation == "local":
        chosen.append(f"federation.max_in_flight={args.max_in_flight}")
    cfg = compose(chosen)
    use_free_ports(cfg)
    ports = ["control_port"]
    if federation == "local":
        ports += ["fleet_port", "supernode_ports_from"]
    return chosen + [f"federation.{p}={cfg.federation[p]}" for p in ports]


def run_step(engine: str, shards: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    run_dir = root / f"{engine}-{shards}"
    argv = [
        sys.executable, "-m", "cli.main", "run",
        *overrides(engine, shards, args),
        f"output.run_dir={run_dir}",
    ]  # fmt: skip
    log = root / f"{engine}-{shards}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = Sampler(proc.pid, args.sample_every, int(args.min_free_gib * GIB))
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    wall = time.perf_counter() - start
    silos = 4 * shards + 1
    result: dict[str, Any] = {
        "engine": engine,
        "silos": silos,
        "shards": shards,
        "max_in_flight": args.max_in_flight if engine == "deployment" else None,
        "exit_code": code,
        "command_seconds": round(wall, 1),
        "peak_pss_gib": round(sampler.peak_total / GIB, 2),
        "min_available_gib": round(sampler.min_available / GIB, 2),
        "peak_process_mib": {k: round(v / MIB) for k, v in sampler.peak_by_kind.items()},
        "peak_processes": sampler.peak_count,
        "out_of_memory": sampler.out_of_memory,
        "time": time.ctime(),
    }
    if engine == "deployment":  # warm runtimes unless the launcher found too little memory
        result["silos_work"] = "cold" if "the silos work cold" in log.read_text() else "warm"
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(r) for r in metrics.read_text().splitlines()] if metrics.exists() else []
    completed = code == 0 and len(lines) == args.rounds + 1
    result["completed"] = completed
    if completed:
        seconds = [line["wall_seconds"] for line in lines if 0 < line["round"] < args.rounds]
        result["mean_round_seconds"] = round(statistics.mean(seconds), 2)
        result["run_seconds"] = json.loads((run_dir / "summary.json").read_text())["wall_seconds"]
    else:
        result["log_tail"] = log.read_text().splitlines()[-3:]
    work = f" ({result['silos_work']})" if "silos_work" in result else ""
    print(
        f"{engine:<10} {silos:>5} silos{work}: "
        + (f"round {result['mean_round_seconds']:7.2f} s, " if completed else "FAILED, ")
        + f"command {wall:7.1f} s, peak PSS {result['peak_pss_gib']:5.2f} GiB, "
        f"min free {result['min_available_gib']:5.2f} GiB, largest per kind (MiB) "
        f"{result['peak_process_mib']}",
        flush=True,
    )
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for engine in sorted({r["engine"] for r in results}):
        done = [r for r in results if r["engine"] == engine and r["completed"]]
        if done:
            ax.plot(
                [r["silos"] for r in done],
                [r["mean_round_seconds"] for r in done],
                marker="o",
                label=engine,
            )
    ax.set(xscale="log", yscale="log", xlabel="silos", ylabel="seconds per round (FedAvg)")
    ax.set_title("round time against silos (2 cores, 24 GiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("simulation", "deployment"), required=True)
    parser.add_argument(
        "--silos",
        type=int,
        nargs="+",
        required=True,
        help="source silos per step (rounded up to a multiple of 4)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="local steps per round")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=8,
        help="deployment: silos working at once (federation.max_in_flight)",
    )
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--min-free-gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="JSON file, updated after every step")
    parser.add_argument("--plot", type=Path, help="plot of every engine in --out")
    args = parser.parse_args()  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="fedalign-scale-") as tmp:
        for sources in args.silos:
            result = run_step(args.engine, math.ceil(sources / 4), args, Path(tmp))
            results.append(result)
            if args.out:
                save(args, result)
            if not result["completed"]:
                break
    done = [r["silos"] for r in results if r["completed"]]
    print(f"largest {args.engine} federation that completed {args.rounds} rounds: "
          f"{max(done) if done else 0} silos")  # fmt: skip


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Add ``result`` to ``--out`` (replacing an earlier step of the same engine and size) and
    redraw ``--plot``: a stopped scan keeps the steps it finished."""
    saved = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    key = (result["engine"], result["silos"])
    runs = [r for r in saved if (r["engine"], r["silos"]) != key] + [result]
    runs.sort(key=lambda r: (r["engine"], r["silos"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "rounds": args.rounds}
    args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
