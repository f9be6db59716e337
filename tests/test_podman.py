"""The container federation for real (`make test-containers`, docs/containers.md): a base image
from Debian packages (`make image-base`), the app image from docker/app.Dockerfile
(`make compose-build`), and docker/compose.yml + compose.tls.yml brought up with Podman
(`make compose-up`): a SuperLink, and per benchmark silo a SuperNode and its ClientApp's
executor, with TLS and SuperNode authentication. The tests run in file order on one federation;
the last one tears it down and checks that nothing is left."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.topology import REPO

pytestmark = pytest.mark.containers

SILOS = {"mnist": "source", "syn": "source", "usps": "source", "svhn": "source", "mnistm": "target"}
KILLED = "usps"
UID = "49999"  # a non-root user, as in Flower's images; the state folders belong to it
APP_IMAGE = "localhost/fedalign/app:test"
FLOWER_PREFIX = "localhost/fedalign"
BASE_IMAGE = "localhost/fedalign-base:bookworm"
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"


def cpu_torch_wheel() -> Path | None:
    """The CPU build of torch in pip's find-links folder, for this Python, if one lies there."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in re.findall(r"find-links='([^']+)'", out):
        for wheel in sorted(Path(folder).glob(f"torch-*+cpu-{tag}-*.whl")):
            return wheel
    return None


def missing() -> str | None:
    if os.geteuid() != 0:
        return "Podman runs the federation as root here (rootless needs subuid maps)"
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make container-deps installs it as root)"
    if not PODMAN_COMPOSE.exists():
        return "podman-compose is not installed in the venv (make container-deps)"
    if cpu_torch_wheel() is None:
        return "no CPU build of torch on this machine: the image would fetch a CUDA build of GBs"
    return None


class Federation:
    """One compose project with its own image store, volumes and timings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.project = f"fatest{uuid.uuid4().hex[:6]}"
        self.volumes = root / "volumes"
        self.measured: dict[str, float | str] = {}
        conf = root / "containers.conf"
        # root here may not raise rlimits to Podman's defaults (docs/containers.md, "Podman")
        conf.write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        )
        storage = root / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\n'
            f'runroot = "{root / "run"}"\n'
        )
        wheel = cpu_torch_wheel()
        assert wheel is not None
        ca_dir = Path("/usr/local/share/ca-certificates")
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "DOCKER_COMPOSE": str(PODMAN_COMPOSE),
            "PROJECT": self.project,
            "VOLUMES": str(self.volumes),
            "TLS": "1",
            "FEDALIGN_UID": UID,
            "FEDALIGN_GID": UID,
            "FEDALIGN_IMAGE": APP_IMAGE,
            "FLWR_IMAGE_PREFIX": FLOWER_PREFIX,
            "BASE_IMAGE": BASE_IMAGE,
            "TORCH_VERSION": wheel.name.split("-")[1],
            "TORCHVISION_VERSION": "none",  # none matches this torch build
            "WHEELS": str(wheel.parent),
            "EXTRA_CA_DIR": str(ca_dir) if any(ca_dir.glob("*.crt")) else "",
        }

    def make(self, target: str, *args: str, timeout: float = 900) -> str:
        started = time.monotonic()
        out = subprocess.run(
            ["make", "-s", "-C", str(REPO), target, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.measured[f"make {target} (s)"] = round(time.monotonic() - started, 1)
        text = out.stdout + out.stderr
        assert out.returncode == 0, f"make {target} failed:\n{text[-3000:]}"
        return text

    def podman(self, *args: str, check: bool = True, stderr: bool = False) -> str:
        """podman's output (stdout; with ``stderr``, both: a container's log, an error)."""
        out = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if check:
            assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr[-2000:]}"
        return out.stdout + out.stderr if stderr else out.stdout

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def teardown(self) -> None:
        """Containers, networks, images and the image store: everything the test made."""
        subprocess.run(["make", "-s", "-C", str(REPO), "compose-down"], env=self.env,
                       capture_output=True, timeout=300)  # fmt: skip
        subprocess.run(["podman", "rm", "-a", "-f", "-t", "1"], env=self.env, capture_output=True)
        subprocess.run(["podman", "rmi", "-a", "-f"], env=self.env, capture_output=True)
        subprocess.run(["podman", "network", "rm", "-f", f"{self.project}_default"],
                       env=self.env, capture_output=True)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def federation() -> Federation:
    reason = missing()
    if reason:
        pytest.skip(reason)
    root = Path(os.environ.get("TMPDIR", "/var/tmp")) / f"fedalign-podman-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    fed = Federation(root)
    try:
        fed.make("image-base")
        fed.make("compose-build")
        started = time.monotonic()
        fed.make("compose-up")
        fed.measured["started"] = started
        yield fed
    finally:
        fed.teardown()


def test_images_are_built_and_run_as_a_non_root_user(federation):
    images = json.loads(federation.podman("images", "--format", "json"))
    sizes = {name: image["Size"] for image in images for name in image.get("Names") or []}
    assert {APP_IMAGE, BASE_IMAGE} <= set(sizes), sizes
    federation.measured["app image (MB)"] = round(sizes[APP_IMAGE] / 1e6)
    federation.measured["base image (MB)"] = round(sizes[BASE_IMAGE] / 1e6)
    # the stand-ins for Flower's SuperLink and SuperNode images are the app image itself
    for role in ("superlink", "supernode"):
        assert f"{FLOWER_PREFIX}/{role}:1.39.0" in sizes
    out = federation.podman(
        "run", "--rm", "--entrypoint", "sh", APP_IMAGE, "-c",
        "id -u; python -c 'import torch, flwr, fedalign; print(flwr.__version__)'; "
        "for tool in flower-superlink flower-supernode flower-superexec fedalign; do "
        "command -v $tool; done",
    )  # fmt: skip
    lines = out.split()
    assert lines[0] == UID and "1.39.0" in lines, out
    assert (
        sum(line.endswith(("superlink", "supernode", "superexec", "fedalign")) for line in lines)
        == 4
    )


def test_each_silo_container_reads_only_its_own_data_read_only(federation):
    data = federation.volumes / "data"
    for domain in SILOS:
        executor = federation.container(f"clientapp-{domain}")
        mounts = json.loads(federation.podman("inspect", executor))[0]["Mounts"]
        seen = {m["Destination"]: (Path(m["Source"]), m["RW"]) for m in mounts}
        assert seen == {
            "/app/data": (data / domain, False),
            "/app/state": (federation.volumes / "state" / domain, True),
        }, seen
        listing = federation.podman("exec", executor, "ls", "/app/data/digits5").split()
        assert sorted(listing) == ["manifest.json", f"{domain}.npz"], listing
        write = federation.podman(
            "exec", executor, "touch", "/app/data/x", check=False, stderr=True
        )
        assert "Read-only file system" in write, write
        # the SuperNode of the silo holds no data at all
        supernode = json.loads(
            federation.podman("inspect", federation.container(f"supernode-{domain}"))
        )
        assert all(m["Destination"] != "/app/data" for m in supernode[0]["Mounts"])


def test_fedka_runs_and_survives_a_killed_silo(federation):
    """Two rounds of FedKA through `fedalign submit`; one silo's containers are killed when
    round 2 starts, and the run completes without it."""
    cmd = ["make", "-s", "-C", str(REPO), "compose-run",
           "ARGS=strategy=fedka rounds=2 wandb.mode=disabled"]  # fmt: skip
    submitted = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, killed = [], False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("round 2/2: training") and not killed:  # round 1 is done
            now = time.monotonic()
            federation.measured["first round, from compose up (s)"] = round(
                now - float(federation.measured["started"]), 1
            )
            federation.measured["first round, from submit (s)"] = round(now - submitted, 1)
            for role in ("clientapp", "supernode"):
                federation.podman("kill", federation.container(f"{role}-{KILLED}"))
            killed = True
    assert proc.wait(timeout=60) == 0, "".join(lines)[-3000:]
    text = "".join(lines)
    assert killed and "finished:completed" in text, text[-3000:]
    runs = sorted((federation.volumes / "outputs").glob("*/summary.json"))
    assert len(runs) == 1, runs
    summary = json.loads(runs[0].read_text())
    federation.measured["2-round FedKA run (s)"] = summary["wall_seconds"]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2, summary
    assert summary["final_target_accuracy"] > summary["initial_target_accuracy"] + 0.1, summary
    assert summary["silos_not_finished"] == [KILLED], summary
    assert sorted(summary["silos"].values()) == sorted(SILOS)
    for domain in set(SILOS) - {KILLED}:  # each executor was served by its silo's warm runtime
        log = federation.podman("logs", federation.container(f"clientapp-{domain}"), stderr=True)
        assert "silo runtime ready" in log and "handling " in log, log[-2000:]
        assert "this ClientApp does the work" not in log, log[-2000:]


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    from server.certs import make_certificates

    intruder = federation.root / "intruder"
    make_certificates(intruder, ["intruder"])  # a key the SuperLink never registered
    os.chown(intruder / "silos" / "intruder", int(UID), int(UID))
    out = subprocess.run(
        ["podman", "run", "--rm", "--user", UID, "--network", f"{federation.project}_default",
         "-v", f"{federation.volumes / 'certs'}:/app/certs:ro",
         "-v", f"{intruder / 'silos'}:/app/keys:ro",
         "--entrypoint", "flower-supernode", f"{FLOWER_PREFIX}/supernode:1.39.0",
         "--root-certificates", "/app/certs/ca.crt",
         "--auth-supernode-private-key", "/app/keys/intruder",
         "--superlink", "superlink:9092", "--node-config", 'domain="mnist" role="source"'],
        env=federation.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Failed to activate SuperNode" in out.stdout + out.stderr, (out.stdout + out.stderr)[
        -2000:
    ]


def test_teardown_leaves_nothing_behind(federation):
    started = time.monotonic()
    federation.make("compose-down")
    federation.measured["compose down (s)"] = round(time.monotonic() - started, 1)
    assert federation.podman("ps", "-a", "-q").strip() == ""
    networks = federation.podman("network", "ls", "--format", "{{.Name}}").split()
    assert not [n for n in networks if n.startswith(federation.project)], networks
    federation.podman("rmi", "-a", "-f")
    assert federation.podman("images", "-q").strip() == ""
    left = subprocess.run(["pgrep", "-f", str(federation.root)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes of the test's image store left: {left.stdout}"
    measured = {k: v for k, v in federation.measured.items() if k != "started"}
    print("\ncontainer federation, measured:", json.dumps(measured, indent=1))
