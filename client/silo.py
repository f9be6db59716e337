"""Who a silo is: its domain, role and data, read from the SuperNode's node-config.

Deployment: ``flower-supernode --node-config 'domain="mnist" role="source"'`` (optional keys:
``data-dir="/path/to/cache"``, ``data-source="imagefolder"`` (a site's own kind of data;
default: the run's ``data.source``), ``threads=2``, ``device="cuda"``, ``state-dir="/path"`` where
the silo keeps its state between rounds for resumed runs; default ``$FEDALIGN_STATE_DIR``,
else ``<cache>/silo-state``). Without ``data-dir`` the data cache is ``$FEDALIGN_CACHE`` (a
container sets both where its own volumes are mounted: docker/compose.yml).
Simulation: virtual SuperNodes only have ``partition-id``; partition i is the i-th silo of the
run's config (``fedalign.config.silos``: ``data.domains`` order, sources split in ``data.shards``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flwr.app import Context

from fedalign.config import ROLES, ConfigError, silos


@dataclass(frozen=True)
class SiloIdentity:
    domain: str
    role: str
    data_dir: str | None
    threads: int
    device: str | None
    state_dir: str | None = None
    data_source: str | None = None  # the site's own kind of data (imagefolder, npz, ...)


def _run_config(context: Context) -> dict[str, Any]:
    text = str(context.run_config.get("config-json", "") or "")
    return json.loads(text) if text else {}


def identify(context: Context) -> SiloIdentity:
    """Read this silo's identity; raise ConfigError (one line) when the node-config is wrong."""
    node = context.node_config
    if "domain" in node:
        domain, role = str(node["domain"]), str(node.get("role", ""))
    elif "partition-id" in node:
        cfg = _run_config(context)
        if not cfg:
            raise ConfigError("simulation needs the run config; start it with `fedalign simulate`")
        run_silos = silos(cfg)
        pid = int(node["partition-id"])
        if pid >= len(run_silos):
            raise ConfigError(
                f"partition-id {pid} has no silo: the run has {len(run_silos)} silos; "
                f"set num-supernodes={len(run_silos)}"
            )
        domain, role = run_silos[pid].domain, run_silos[pid].role
    else:
        raise ConfigError(
            "this SuperNode's node-config names no domain; start it with "
            '--node-config \'domain="<domain>" role="source|target"\''
        )
    if role not in ROLES:
        raise ConfigError(
            f"role={role!r} is unknown (known: {', '.join(ROLES)}); "
            "fix the SuperNode's --node-config"
        )
    data_dir = node.get("data-dir")
    return SiloIdentity(
        domain=domain,
        role=role,
        data_dir=str(data_dir) if data_dir else None,
        threads=int(node.get("threads", 0)),
        device=str(node["device"]) if "device" in node else None,
        state_dir=str(node["state-dir"]) if "state-dir" in node else None,
        data_source=str(node["data-source"]) if "data-source" in node else None,
    )
