"""Shared fixtures: one offline benchmark cache per session; the in-process Flower grid
(``server/inprocess.py``) re-exported for the tests."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

# Two xdist workers share 2 cores: one torch thread each does the same work with about 17 %
# less CPU than two each (measured on tests/test_fedka.py + test_baselines.py: 89 against 107
# CPU-s). Silos set their own threads (federation.threads_per_silo); this is for in-process work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

from server.inprocess import InProcessGrid, make_context  # noqa: F401 (the tests' grid)
from server.processes import port_in_use

SMALL_DOMAINS = ("mnist", "usps", "mnistm")
CACHED_DOMAINS = (*SMALL_DOMAINS, "syn")  # syn: a third source where a test needs one

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so
# would every `fedalign run` it starts; the Ctrl-C tests need the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--containers",
        action="store_true",
        help="run the container tests (make test-containers): they build images with Podman",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The files with end-to-end tests first: the xdist workers (make test: one file at a time)
    # start on the long deployments and fill in with short files, instead of ending on a long
    # one alone.
    items.sort(key=lambda item: "e2e" not in item.keywords)
    if config.getoption("--containers"):
        return
    skip = pytest.mark.skip(reason="builds images and starts containers: make test-containers")
    for item in items:
        if "containers" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the domains the federation tests use (built once)."""
    from fedalign.data import build_all

    cache = tmp_path_factory.mktemp("digits-cache")
    build_all(cache_dir=cache, domains=CACHED_DOMAINS)
    return cache


@pytest.fixture
def task_identity() -> None:
    """Flower's Message() needs a task identity; a real run sets it, unit tests set it here."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def silo_config(cache: Path | str, **extra: object) -> dict:
    """What the server tells a silo in a message (data, model, training), for tests."""
    return {
        "data-source": "digits5",
        "data-seed": 0,
        "data-cache-dir": str(cache),
        "model": "digit_cnn",
        "num-classes": 10,
        "in-channels": 3,
        "device": "cpu",
        "seed": 0,
        "local-steps": 15,
        "batch-size": 32,
        "lr": 1e-3,
        "optimizer": "adam",
        "server-round": 1,
        **extra,
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def port_overrides(silos: int = 3) -> list[str]:
    control, fleet, *_ = ports = free_ports(2 + silos)
    # SuperNode ports are consecutive from supernode_ports_from: find a free run of them.
    base = max(ports) + 1
    while any(port_in_use("127.0.0.1", base + i) for i in range(silos)):
        base += silos
    return [
        f"federation.control_port={control}",
        f"federation.fleet_port={fleet}",
        f"federation.supernode_ports_from={base}",
    ]


def small_federation(
    cache: Path, run_dir: Path, *extra: str, domains: tuple[str, ...] = SMALL_DOMAINS
):
    """A validated config for a real deployment of ``domains`` (by default mnist, usps ->
    mnistm, the target) on free loopback ports, writing to ``run_dir``; ``extra`` are Hydra
    overrides."""
    from omegaconf import OmegaConf

    from fedalign.config import compose, validate

    cfg = compose(
        [
            f"data.domains=[{','.join(domains)}]",
            f"data.cache_dir={cache}",
            "wandb.mode=disabled",
            *extra,
            *port_overrides(len(domains)),
        ]
    )
    validate(cfg)
    OmegaConf.update(cfg, "output.run_dir", str(run_dir), force_add=True)
    return cfg
