"""Benchmark Fisher merging against a memory copy and FedAvg, and the Fisher's compute cost.

Measures, in one run (best of ``--repeats`` each):

* ``fisher_merge`` of K silos of a resnet18-shaped model, a plain copy of the same bytes
  (K parameter sets + K Fishers) and FedAvg's weighted average of the K parameter sets;
* ``diagonal_fisher(mode="exact")`` on the digit CNN for 512 examples against one local epoch
  of training on 512 examples (Adam, batch 32);
* the vectorised per-example gradients against a naive per-example, per-class loop.

Usage: ``python bench/bench_merge.py --silos 10 --params 11_000_000 --repeats 3``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedalign.fisher import diagonal_fisher
from fedalign.merge import fisher_merge
from fedalign.models import DigitCNN, build_model
from fedalign.train import TrainConfig, to_input, train_local

GB = 1e9
FISHER_EXAMPLES = 512
LOOP_EXAMPLES = 128


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``run``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_shapes(n_params: int) -> list[tuple[int, ...]]:
    """resnet18's parameter shapes, cycled and cut so they hold exactly ``n_params`` values."""
    resnet = itertools.cycle([tuple(p.shape) for p in build_model("resnet18").parameters()])
    shapes, total = [], 0
    while total < n_params:
        shape = next(resnet)
        size = min(math.prod(shape), n_params - total)
        shapes.append(shape if size == math.prod(shape) else (size,))
        total += size
    return shapes


def random_silos(
    shapes: list[tuple[int, ...]], silos: int, seed: int
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """K silos of random float32 parameters and non-negative Fishers."""
    rng = np.random.default_rng(seed)
    params = [[rng.standard_normal(s, dtype=np.float32) for s in shapes] for _ in range(silos)]
    fishers = [[rng.random(s, dtype=np.float32) for s in shapes] for _ in range(silos)]
    return params, fishers


def fedavg(params: list[list[np.ndarray]], counts: list[float]) -> list[np.ndarray]:
    """Flower's FedAvg arithmetic: ``value * weight`` summed in place, silo by silo."""
    factors = [c / sum(counts) for c in counts]
    total = [a * factors[0] for a in params[0]]
    for silo, factor in zip(params[1:], factors[1:], strict=True):
        for acc, a in zip(total, silo, strict=True):
            acc += a * factor
    return total


def copy_all(sources: list[list[np.ndarray]], targets: list[list[np.ndarray]]) -> None:
    for source, target in zip(sources, targets, strict=True):
        for s, t in zip(source, target, strict=True):
            np.copyto(t, s)


def bench_merge(silos: int, n_params: int, repeats: int) -> dict[str, float]:
    """Throughput of merge and FedAvg relative to a copy of the same bytes; prints each."""
    params, fishers = random_silos(layer_shapes(n_params), silos, seed=0)
    counts = [float(1000 + 100 * i) for i in range(silos)]
    sources = params + fishers
    targets = [[np.empty_like(a) for a in silo] for silo in sources]
    param_bytes = sum(a.nbytes for silo in params for a in silo)
    times = {
        "merge": best_time(lambda: fisher_merge(params, fishers, counts), repeats),
        "copy": best_time(lambda: copy_all(sources, targets), repeats),
        "fedavg": best_time(lambda: fedavg(params, counts), repeats),
    }
    read = {"merge": 2 * param_bytes, "copy": 2 * param_bytes, "fedavg": param_bytes}
    for name, seconds in times.items():
        print(
            f"{name:<7} K={silos} params={n_params:,}: {seconds * 1e3:8.1f} ms, "
            f"{read[name] / seconds / GB:6.2f} GB/s of input"
        )
    throughput = {name: read[name] / seconds for name, seconds in times.items()}
    for name in ("merge", "fedavg"):
        print(
            f"throughput ratio {name}/copy: {throughput[name] / throughput['copy']:.2f} "
            "(goal >= 0.5)"
        )
    return {name: throughput[name] / throughput["copy"] for name in ("merge", "fedavg")}


def bench_fisher_cost(repeats: int) -> float:
    """Exact Fisher on 512 examples vs one local epoch on them; returns the time ratio."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (FISHER_EXAMPLES, 3, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, FISHER_EXAMPLES)
    inputs = list(to_input(x, torch.device("cpu")).split(128))
    model = DigitCNN()
    epoch = TrainConfig(local_steps=FISHER_EXAMPLES // 32, batch_size=32, log_every=0)

    def fisher() -> object:
        return diagonal_fisher(model, inputs, mode="exact", n_examples=FISHER_EXAMPLES)

    def train() -> object:
        return train_local(model, x, y, epoch, torch.device("cpu"))

    diagonal_fisher(model, inputs[:1], mode="exact", n_examples=32)
    train()
    fisher_s, train_s = best_time(fisher, repeats), best_time(train, repeats)
    print(f"fisher  exact, DigitCNN, {FISHER_EXAMPLES} examples: {fisher_s:7.2f} s")
    print(f"train   one epoch, Adam, batch 32, {FISHER_EXAMPLES} examples: {train_s:7.2f} s")
    print(f"ratio fisher/epoch (time): {fisher_s / train_s:.1f}")
    return fisher_s / train_s


def naive_exact_fisher(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exact Fisher with one forward per example and one autograd call per class."""
    model.eval()
    params = dict(model.named_parameters())
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(len(x)):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        for y in range(len(log_p)):
            grads = torch.autograd.grad(log_p[y], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                totals[name] += log_p[y].exp().detach() * g.square()
    return {name: total / len(x) for name, total in totals.items()}


def bench_per_example(repeats: int) -> float:
    """Vectorised exact Fisher vs the naive loop on the same examples; returns the speed-up."""
    torch.manual_seed(2)
    model = DigitCNN()
    x = torch.randn(LOOP_EXAMPLES, 3, 28, 28)
    fast = diagonal_fisher(model, [x], mode="exact")
    slow = naive_exact_fisher(model, x)
    agree = all(np.allclose(fast[n], slow[n].numpy(), rtol=1e-3, atol=1e-12) for n in fast)
    fast_s = best_time(lambda: diagonal_fisher(model, [x], mode="exact"), repeats)
    slow_s = best_time(lambda: naive_exact_fisher(model, x), repeats)
    print(f"per-example vmap, {LOOP_EXAMPLES} examples: {fast_s:7.2f} s")
    print(f"per-example loop, {LOOP_EXAMPLES} examples: {slow_s:7.2f} s (same result: {agree})")
    print(f"speed-up vmap/loop: {slow_s / fast_s:.1f}x")
    return slow_s / fast_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=10)
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=11_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the ratios as JSON here")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, numpy {np.__version__}")
    ratios = bench_merge(args.silos, args.params, args.repeats)
    fisher_ratio = bench_fisher_cost(args.repeats)
    speed_up = bench_per_example(args.repeats)
    print(
        f"summary: merge throughput = {ratios['merge']:.2f}x copy, "
        f"fedavg throughput = {ratios['fedavg']:.2f}x copy, "
        f"exact Fisher = {fisher_ratio:.1f}x a local epoch, "
        f"vmap = {speed_up:.1f}x faster than a per-example loop"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        values = {
            "silos": args.silos,
            "params": args.params,
            "merge_throughput_over_copy": ratios["merge"],
            "fedavg_throughput_over_copy": ratios["fedavg"],
            "exact_fisher_over_local_epoch": fisher_ratio,
            "vmap_speed_up_over_loop": speed_up,
        }
        args.out.write_text(json.dumps(values, indent=2) + "\n")


if __name__ == "__main__":
    main()
