"""What a fresh ClientApp process pays before it can work: imports, data, model.

Flower 1.39 starts a new ``flwr-clientapp`` process for every message, so these seconds are paid
by every silo in every message phase. Each figure is the median of ``--repeats`` fresh Python
processes, measured in this run:

* ``flwr``: ``import flwr.clientapp`` (Flower's own floor);
* ``client.app``: importing fedalign's ClientApp module (data rendering libraries are imported
  only when a domain is built, never on a cached load);
* ``client.app, eager``: the same plus scikit-learn, matplotlib and scikit-image, which the module
  imported before the lazy imports (the "before" of that change);
* ``torch``: ``import torch`` (paid once per message by any torch ClientApp);
* ``torch.optim first use``: creating the first optimizer imports ``torch._dynamo`` (torch
  2.14's ``Optimizer`` methods are wrapped to disable the compiler, which imports it);
* ``data``: loading and verifying one cached domain (mnistm).

And one server-side cost per round: redrawing ``accuracy.png`` (10 rounds, 5 silos), which the
ServerApp did after every round before it was limited to once per 30 s and the run's end.

Usage: ``python bench/bench_startup.py --out docs/perf/startup.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

STEPS = {
    "flwr": "import flwr.clientapp",
    "client.app": "import client.app",
    "client.app, eager": "import client.app, sklearn.datasets, matplotlib, skimage",
    "torch": "import torch",
    "torch.optim first use": "torch.optim.Adam(torch.nn.Linear(2, 2).parameters())",
    "data": "from client.runtime import load_domain",
}
TIMED = """
import time
{setup}
start = time.perf_counter()
{code}
print(time.perf_counter() - start)
"""


def seconds(name: str) -> float:
    code = STEPS[name]
    setup = ""
    if name == "data":
        setup, code = code, "load_domain('digits5', 'mnistm', None, 0)"
    if name == "torch.optim first use":
        setup = "import torch"
    out = subprocess.run(
        [sys.executable, "-c", TIMED.format(setup=setup, code=code)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def plot_seconds(repeats: int) -> float:
    """Median seconds of one accuracy.png redraw of a 10-round, 5-silo run (matplotlib warm)."""
    import tempfile
    import time

    from fedalign.runlog import RunRecorder

    with tempfile.TemporaryDirectory() as tmp:
        recorder = RunRecorder(Path(tmp), {"name": "bench"}, target="t")
        for rnd in range(10):
            for silo in ("a", "b", "c", "d", "t"):
                recorder.silo(rnd, silo, {"test-accuracy": 0.05 * rnd})
            recorder.complete(rnd)
        recorder.plot()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            recorder.plot()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for name in STEPS:
        results[name] = statistics.median(seconds(name) for _ in range(args.repeats))
        print(f"{name:<18} {results[name]:6.3f} s", flush=True)
    before, after = results["client.app, eager"], results["client.app"]
    print(f"lazy imports: client.app import {after:.2f} s vs {before:.2f} s eager "
          f"({before - after:.2f} s saved per ClientApp process)")  # fmt: skip
    results["accuracy.png redraw"] = plot_seconds(args.repeats)
    print(f"accuracy.png redraw: {results['accuracy.png redraw']:.3f} s per round before, "
          "now at most every 30 s")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"median_seconds": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
