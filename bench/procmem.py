"""Memory of a process tree from /proc (Linux): proportional set size by kind of process."""

from __future__ import annotations

import os
import signal
import threading
from collections import defaultdict
from pathlib import Path

KINDS = (  # command-line fragment -> kind, first match wins
    ("client.runtime_worker", "runtime"),
    ("client.silo_runtime", "runtime-supervisor"),
    ("flower-superexec", "superexec"),
    ("flower-supernode", "supernode"),
    ("flower-superlink", "superlink"),
    ("flwr-clientapp", "clientapp"),
    ("flwr-serverapp", "serverapp"),
    ("ray::", "ray-worker"),
    ("raylet", "ray"),
    ("gcs_server", "ray"),
)


def children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process now running."""
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree[ppid].append(int(entry.name))
    return tree


def descendants(root: int) -> list[int]:
    tree, found, todo = children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (torch's libraries) divided among their users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def kind(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    return next((k for fragment, k in KINDS if fragment in cmdline), "other")


def tree_memory(root: int | None = None) -> dict[str, list[int]]:
    """Kind -> PSS in bytes of each process under ``root`` (default: this process)."""
    result: dict[str, list[int]] = defaultdict(list)
    for pid in descendants(root or os.getpid()):
        result[kind(pid)].append(pss_bytes(pid))
    return dict(result)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    from server.launcher import available_memory

    return available_memory() or 0


class Sampler(threading.Thread):
    """Samples the memory of ``pid``'s process tree every ``every`` seconds until stopped."""

    def __init__(self, pid: int, every: float, min_free: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.min_free = pid, every, min_free
        self.done = threading.Event()
        self.peak_total = 0
        self.peak_by_kind: dict[str, int] = {}  # kind -> largest single process
        self.peak_count: dict[str, int] = {}
        self.min_available = available_bytes()
        self.out_of_memory = False

    def run(self) -> None:
        while not self.done.wait(self.every):
            memory = tree_memory(self.pid)
            self.peak_total = max(self.peak_total, sum(sum(v) for v in memory.values()))
            for kind, sizes in memory.items():
                self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), max(sizes))
                self.peak_count[kind] = max(self.peak_count.get(kind, 0), len(sizes))
            self.min_available = min(self.min_available, available_bytes())
            if self.min_available < self.min_free:
                self.out_of_memory = True
                os.killpg(self.pid, signal.SIGTERM)
                return
