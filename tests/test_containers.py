"""docker/: static checks of every Dockerfile and compose file, and their topologies run for
real as processes (tests/topology.py) against the pinned Flower."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.topology import DOCKER, REPO, Topology, compose_config

SILOS = {"mnist": "source", "syn": "source", "usps": "source", "svhn": "source", "mnistm": "target"}
# A short run: every service and flag is exercised, the learning itself is not the point here.
SHORT = ("rounds=1", "train.local_steps=5", "wandb.mode=disabled")

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None and not os.environ.get("CI"),
    reason="docker-compose (Debian package) not installed; .ci/run installs it",
)
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
    reason="the topology runs in network namespaces: needs root, iproute2 and util-linux",
)


def example_env(name: str, tmp_path: Path, **values: str) -> Path:
    """docker/<name>.env.example with some values replaced (as a site would fill it in)."""
    lines = []
    for line in (DOCKER / f"{name}.env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    lines += [f"{key}={value}" for key, value in values.items()]
    path = tmp_path / f"{name}.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def env_file_values(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and line[0] != "#"
    )


@needs_compose
@pytest.mark.parametrize(
    ("files", "env_name"),
    [
        (["compose.yml"], None),
        (["compose.yml", "compose.tls.yml"], None),
        (["server.compose.yml"], "server"),
        (["silo.compose.yml"], "silo"),
    ],
)
def test_compose_files_are_valid(files, env_name, tmp_path):
    env = env_file_values(DOCKER / f"{env_name}.env.example") if env_name else {}
    model = compose_config([DOCKER / f for f in files], env, "check")
    for name, service in model["services"].items():
        assert service.get("entrypoint"), f"{name}: entrypoint must be explicit (the test runs it)"
        assert service.get("user"), f"{name}: runs as a non-root user"
        assert service.get("healthcheck"), f"{name}: healthcheck (or an explicit disable)"
    if files == ["compose.yml"]:
        for domain in SILOS:
            mounts = model["services"][f"clientapp-{domain}"]["volumes"]
            data = [m for m in mounts if m.split(":")[1] == "/app/data"]
            assert data == [f"{DOCKER}/volumes/data/{domain}:/app/data:ro"]
            assert not any(
                "/data" in str(m)
                for m in model["services"][f"supernode-{domain}"].get("volumes", [])
            )


@needs_compose
def test_silo_recipe_says_what_is_missing(tmp_path):
    out = subprocess.run(
        ["docker-compose", "-f", str(DOCKER / "silo.compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        timeout=60,
    )
    assert out.returncode != 0
    assert "set FEDALIGN_SILO" in out.stderr or "set FEDALIGN_SUPERLINK" in out.stderr


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run(
        [str(hadolint), "--config", str(DOCKER / "hadolint.yaml"), str(DOCKER / "app.Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_context_holds_only_code():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*", "everything is excluded unless listed"
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "fedalign",
        "server",
        "client",
        "strategies",
        "cli",
        "conf",
    }
    copied = [
        line.split()[-2].rstrip("/")
        for line in (DOCKER / "app.Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    assert {Path(c).name for c in copied} | {"pyproject.toml", "README.md"} == allowed


def run_short_federation(
    topology: Topology, executors: list[str], submit: str, extra: tuple[str, ...] = ()
) -> None:
    """Once every silo's executor is healthy, the submit service runs a short federation."""
    for key in executors:
        topology.wait_healthy(key)
    out = topology.run_once(submit, (*SHORT, *extra))
    assert "finished:completed" in out, out[-2000:]


def finished_run(outputs: Path) -> dict:
    runs = sorted(outputs.glob("*/summary.json"))
    assert len(runs) == 1, f"expected one run folder in {outputs}: {runs}"
    summary = json.loads(runs[0].read_text())
    assert summary["status"] == "completed", summary
    return summary


@pytest.mark.e2e
@needs_compose
@needs_netns
def test_multi_machine_recipes_with_tls_and_authentication(tmp_path):
    """The server machine and two silo machines (a source and the target), each silo from its
    own env file. compose.yml, the one-host federation, runs in real containers with its TLS
    overlay in tests/test_podman.py (make test-containers)."""
    sites = {domain: SILOS[domain] for domain in ("usps", "mnistm")}
    from fedalign.data import build_all
    from server.certs import make_certificates

    secrets = tmp_path / "operator"
    make_certificates(secrets, list(sites), sans=["link.example.org", "superlink", "localhost"])
    server_secrets = tmp_path / "server-secrets"
    (server_secrets / "silos").mkdir(parents=True)
    for name in ("ca.crt", "superlink.crt", "superlink.key"):
        shutil.copy2(secrets / name, server_secrets / name)
    for domain in sites:
        shutil.copy2(secrets / "silos" / f"{domain}.pub", server_secrets / "silos")
    server_env = example_env(
        "server",
        tmp_path,
        FEDALIGN_SECRETS=str(server_secrets),
        FEDALIGN_VOLUMES=str(tmp_path / "server"),
    )
    topology = Topology(tmp_path / "services", f"fa{uuid.uuid4().hex[:4]}")
    try:
        server = compose_config(
            [DOCKER / "server.compose.yml"], env_file_values(server_env), "server"
        )
        topology.add_project("server", server, profiles=("run",))
        for domain, role in sites.items():
            site = tmp_path / "sites" / domain  # only ca.crt, its key and its data
            (site / "secrets").mkdir(parents=True)
            shutil.copy2(secrets / "ca.crt", site / "secrets")
            shutil.copy2(secrets / "silos" / domain, site / "secrets")
            build_all(site / "data", domains=(domain,))
            env = example_env(
                "silo",
                tmp_path,
                FEDALIGN_SUPERLINK="link.example.org:9092",
                FEDALIGN_SILO=domain,
                FEDALIGN_ROLE=role,
                FEDALIGN_DATA=str(site / "data"),
                FEDALIGN_SECRETS=str(site / "secrets"),
                FEDALIGN_VOLUMES=str(site / "volumes"),
            )
            model = compose_config([DOCKER / "silo.compose.yml"], env_file_values(env), domain)
            topology.add_project(domain, model)
        # The silos reach the server machine by its name, on the ports it publishes.
        topology.write_hosts({"link.example.org": "server/superlink"})
        topology.up("server")
        for domain in sites:
            topology.up(domain)
        domains = f"data.domains=[{','.join(sites)}]"
        run_short_federation(
            topology, [f"{d}/clientapp" for d in sites], "server/submit", (domains,)
        )
    finally:
        leftovers = topology.close()
    assert leftovers == [], "every process of the topology must end"
    finished_run(tmp_path / "server" / "outputs")


def test_executor_healthcheck_follows_its_api():
    """python -m server.health: healthy only while the --runtime-api-address accepts."""
    import socket

    from server import health as server_health
    from server.health import main
    from server.processes import free_port

    port = free_port()
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    argv = [sys.executable, "-c", code, "--runtime-api-address", f"127.0.0.1:{port}"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as executor:
        try:
            assert executor.stdout.readline() == b"up\n"  # its command line is in place
            assert server_health.runtime_address(executor.pid) == ("127.0.0.1", port)
            assert main([str(executor.pid)]) == 1  # nothing listens yet
            with socket.create_server(("127.0.0.1", port)):
                assert main([str(executor.pid)]) == 0
        finally:
            executor.communicate(b"", timeout=30)
    assert main([str(os.getpid())]) == 1  # no --runtime-api-address: unhealthy


def test_flower_error_panel_becomes_one_line():
    from server.submit import flower_error

    drawn = [
        "Using SuperLink: fedalign (127.0.0.1:1)",
        "╭─ Error ──────────╮",
        "│ Connection to the SuperLink is unavailable.  │",
        "│ Check 'address'.  │",
        "╰──────────────────╯",
    ]
    assert flower_error(drawn) == "Connection to the SuperLink is unavailable. Check 'address'."
    assert flower_error(["a", "last words", ""]) == "last words"


MAKE_SETTINGS = {
    "DOCKER_COMPOSE", "TLS", "PROJECT", "VOLUMES", "BASE_IMAGE", "TORCH_VERSION", "WHEELS",
    "TORCHVISION_VERSION", "TORCH_INDEX_URL", "EXTRA_CA_DIR", "FLWR_IMAGE_PREFIX", "FEDALIGN_IMAGE",
}  # fmt: skip


def make_dry_run(target: str, *assignments: str) -> str:
    """The commands ``make TARGET`` would run, with only ``assignments`` set."""
    out = subprocess.run(
        ["make", "-n", "-s", "-C", str(REPO), target, *assignments],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k not in MAKE_SETTINGS},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compose_build_takes_the_build_arguments_it_is_given():
    plain = make_dry_run("compose-build")
    assert "--build-arg" not in plain and " tag " not in plain, plain
    offline = make_dry_run(
        "compose-build",
        "DOCKER_COMPOSE=podman-compose",
        "BASE_IMAGE=localhost/base:1",
        "TORCH_VERSION=2.13.0+cpu",
        "TORCHVISION_VERSION=none",
        "WHEELS=/srv/wheels",
        "EXTRA_CA_DIR=/srv/ca",
        "FLWR_IMAGE_PREFIX=localhost/fa",
    )
    for expected in (
        "--podman-build-args='-v /srv/wheels:/wheels:ro'",
        "--build-arg BASE_IMAGE=localhost/base:1",
        "--build-arg TORCH_VERSION=2.13.0+cpu",
        "--build-arg TORCHVISION_VERSION= ",  # none: no torchvision
        '--build-arg "EXTRA_CA_CERTS=$(cat /srv/ca/*.crt)"',
        "--build-arg WHEELS=/wheels",
        "podman tag fedalign/app:latest localhost/fa/superlink:1.39.0",
        "podman tag fedalign/app:latest localhost/fa/supernode:1.39.0",
    ):
        assert expected in offline, (expected, offline)


def test_compose_up_runs_the_one_shots_first_and_podman_without_deps():
    docker = make_dry_run("compose-up", "TLS=1")
    order = [docker.index(step) for step in ("run --rm data", "run --rm certs", "up -d")]
    assert order == sorted(order), docker
    assert "--no-deps" not in docker
    assert "up -d --no-deps" in make_dry_run("compose-up", "DOCKER_COMPOSE=podman-compose")
