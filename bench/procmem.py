"""Memory of a process tree from /proc (Linux): proportional set size by kind of process."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

KINDS = (  # command-line fragment -> kind, first match wins
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
    """MemAvailable from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
