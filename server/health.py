"""Container healthcheck for an app executor (``flower-superexec``): healthy while the API it
serves (``--runtime-api-address`` on its command line, a SuperLink's or a SuperNode's) accepts
connections. ``python -m server.health [PID]`` exits 0 (healthy) or 1 with one line."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def runtime_address(pid: int = 1) -> tuple[str, int]:
    """The ``--runtime-api-address HOST:PORT`` of process ``pid``."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    for flag in ("--runtime-api-address", "--appio-api-address"):
        if flag in args:
            host, _, port = args[args.index(flag) + 1].rpartition(":")
            return host.strip("[]"), int(port)
    raise ValueError(f"process {pid} has no --runtime-api-address")


def main(argv: list[str]) -> int:
    try:
        host, port = runtime_address(int(argv[0]) if argv else 1)
        with socket.create_connection((host, port), timeout=3):
            return 0
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
