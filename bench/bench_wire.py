"""Bytes on the wire per round, for every strategy and transport option, against the model size.

Each variant runs 3 rounds with every silo in this process (``server/inprocess.py``; bytes do not
depend on where a silo runs) through the ServerApp's metered grid, which counts each message's
serialized Flower objects: exactly what the SuperLink stores and forwards. Round 1 is reported
(round 0 holds FedKA's first embedding, round 3 the final evaluation). Local work is cut to one
step: the bytes do not depend on it.

Usage: ``python bench/bench_wire.py --out docs/perf/wire.json``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fedalign.config import compose, silos, validate

FEDKA_LIGHT = ["strategy.vote_samples=64", "strategy.finetune_steps=1"]
VARIANTS = {  # name -> overrides
    "fedavg": ["strategy=fedavg"],
    "fedavg_stock": ["strategy=fedavg_stock"],
    "fedprox": ["strategy=fedprox"],
    "fedbn": ["strategy=fedbn"],
    "fisher": ["strategy=fisher", "strategy.fisher.samples=32"],
    "fisher float16": [
        "strategy=fisher",
        "strategy.fisher.samples=32",
        "strategy.fisher.transport=float16",
    ],
    "fedvote": ["strategy=fedvote", *FEDKA_LIGHT],
    "fedka": ["strategy=fedka", *FEDKA_LIGHT],
    "fedka embed float16": ["strategy=fedka", *FEDKA_LIGHT, "strategy.embed_transport=float16"],
    "fedka_fisher": ["strategy=fedka_fisher", *FEDKA_LIGHT, "strategy.fisher.samples=32"],
    "fedka_fisher float16": [
        "strategy=fedka_fisher",
        *FEDKA_LIGHT,
        "strategy.fisher.samples=32",
        "strategy.fisher.transport=float16",
        "strategy.embed_transport=float16",
    ],
}


def model_bytes(cfg: object) -> int:
    from fedalign.models import build_model, get_weights

    model = build_model(cfg.model.name, int(cfg.model.num_classes), int(cfg.model.in_channels))
    return sum(np.asarray(a).nbytes for a in get_weights(model).values())


def measure(name: str, overrides: list[str], root: Path) -> dict[str, object]:
    from server.inprocess import run_in_process

    cfg = compose(
        [*overrides, "rounds=3", "train.local_steps=1", "wandb.mode=disabled", f"name=wire-{name}"]
    )
    validate(cfg)
    run_dir = root / name.replace(" ", "-")
    run_in_process(cfg, run_dir, threads=1)
    lines = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    round1 = next(line for line in lines if line["round"] == 1)
    size = model_bytes(cfg)
    sources = sum(s.role == "source" for s in silos(cfg))
    return {
        "variant": name,
        "model_bytes": size,
        "sources": sources,
        "sent": round1["bytes_sent"],
        "received": round1["bytes_received"],
        "total_in_models": (round1["bytes_sent"] + round1["bytes_received"]) / size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedalign-wire-") as tmp:
        for name in args.variants:
            result = measure(name, VARIANTS[name], Path(tmp))
            results.append(result)
            print(
                f"{name:<22} round 1: sent {result['sent'] / 1e6:7.2f} MB, received "
                f"{result['received'] / 1e6:7.2f} MB, total = {result['total_in_models']:5.1f} "
                f"x the model ({result['model_bytes'] / 1e6:.2f} MB, {result['sources']} sources)",
                flush=True,
            )
    by = {r["variant"]: r for r in results}
    for option, base in (
        ("fisher float16", "fisher"),
        ("fedka embed float16", "fedka"),
        ("fedka_fisher float16", "fedka_fisher"),
    ):
        if option in by and base in by:
            before = by[base]["sent"] + by[base]["received"]
            after = by[option]["sent"] + by[option]["received"]
            print(f"{option} / {base}: {after / before:.2f} of the bytes per round")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": results}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
