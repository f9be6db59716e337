"""Run a compose topology for real without a Docker engine (tests only).

``docker-compose config`` resolves the compose files (interpolation, overlays, anchors) exactly
as Docker would. Each service then runs as the processes its container would run: its own
entrypoint and command line from that output, in its own network namespace (its own IP on one
bridge, its own port space, an /etc/hosts that resolves the other services' names) and its own
PID namespace (so its healthcheck sees it as PID 1, as in a container). Container paths in its
arguments and environment are rewritten to host folders by its own volume list; the app image's
ENV comes from docker/app.Dockerfile. The programs are this environment's (the pinned Flower
and fedalign), so every flag and address in the compose files meets the real Flower 1.39.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from server.processes import ENV_BIN, ManagedProcess, ProcessSet, descendants, scripts_first_on_path

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
APP_IMAGE_WORKDIR = "/app/src"  # docker/app.Dockerfile's WORKDIR: this checkout
SUBNET = "10.213.0"


def compose_config(files: list[Path], env: dict[str, str], project: str) -> dict[str, Any]:
    """The resolved compose model, from the real ``docker-compose config``."""
    argv = ["docker-compose", "-p", project]
    for path in files:
        argv += ["-f", str(path)]
    out = subprocess.run(
        [*argv, "config"], capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )
    if out.returncode != 0:
        raise AssertionError(f"docker-compose config failed: {out.stderr.strip()}")
    return yaml.safe_load(out.stdout)


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ``ENV K=V ...`` instructions of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in line[4:].split():
                key, _, value = item.partition("=")
                env[key] = value
    return env


@dataclass
class Service:
    project: str
    name: str
    spec: dict[str, Any]
    ns: str
    ip: str
    root: Path  # this service's private folder (its /tmp, logs)
    proc: ManagedProcess | None = None
    paths: list[tuple[str, str]] = field(default_factory=list)  # container path -> host path

    @property
    def app_image(self) -> bool:
        return "build" in self.spec or "fedalign/app" in str(self.spec.get("image", ""))

    def rewrite(self, value: str) -> str:
        """Container paths in ``value`` -> host paths, in one pass (longest path first)."""
        table = dict(self.paths)
        pattern = "|".join(re.escape(inside) for inside, _ in self.paths)
        return re.sub(
            rf"(?<![\w/.-])({pattern})(?=/|$|[\"' ,])", lambda m: table[m.group(1)], value
        )


class Topology:
    """Services of one or more compose projects, each as a fake container on one bridge."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.services: dict[str, Service] = {}  # key: "project/service"
        self.procs = ProcessSet(env=dict(os.environ))
        self.app_env = dockerfile_env(DOCKER / "app.Dockerfile")
        self._ip("netns", "add", self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    # --------------------------------------------------------------------------- layout
    def add_project(self, project: str, model: dict[str, Any], profiles: tuple = ()) -> None:
        for name, spec in model["services"].items():
            if spec.get("profiles") and not set(spec["profiles"]) & set(profiles):
                continue
            index = len(self.services) + 2
            ns = f"{self.prefix}-{index}"
            service = Service(project, name, spec, ns, f"{SUBNET}.{index}", self.root / ns)
            self._ip("netns", "add", ns)
            veth, peer = f"{self.prefix}v{index}", f"{self.prefix}p{index}"
            self._ip("-n", self.switch, "link", "add", peer, "type", "veth", "peer", veth)
            self._ip("-n", self.switch, "link", "set", veth, "netns", ns)
            self._ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{service.ip}/24", "dev", veth)
            self._ip("-n", ns, "link", "set", veth, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            service.root.mkdir(parents=True)
            for volume in spec.get("volumes", []):
                outside, inside = str(volume).split(":")[:2]
                Path(outside).mkdir(parents=True, exist_ok=True)  # as Docker does
                service.paths.append((inside, outside))
            service.paths.append(("/tmp", str(service.root / "tmp")))
            service.paths.sort(key=lambda pair: -len(pair[0]))
            self.services[f"{project}/{name}"] = service

    def write_hosts(self, aliases: dict[str, str] | None = None) -> None:
        """Each service resolves the names of its own project's services; ``aliases`` map
        extra names (another machine's address) to a "project/service"."""
        for service in self.services.values():
            lines = ["127.0.0.1 localhost"]
            for other in self.services.values():
                if other.project == service.project:
                    lines.append(f"{other.ip} {other.name}")
            for alias, key in (aliases or {}).items():
                lines.append(f"{self.services[key].ip} {alias}")
            folder = Path("/etc/netns") / service.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    # --------------------------------------------------------------------------- running
    def command(self, service: Service, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [*service.spec.get("entrypoint", []), *service.spec.get("command", []), *extra]
        return self.local_argv(service, argv)

    @staticmethod
    def local_argv(service: Service, argv: list[str]) -> list[str]:
        """A container command line with its paths and tools mapped to this machine."""
        argv = [service.rewrite(str(arg)) for arg in argv]
        if (ENV_BIN / argv[0]).exists():
            argv[0] = str(ENV_BIN / argv[0])
        return argv

    def environment(self, service: Service) -> dict[str, str]:
        env = scripts_first_on_path(
            {k: v for k, v in os.environ.items() if not k.startswith("FEDALIGN_")}
        )
        values = {
            **(self.app_env if service.app_image else {}),
            **service.spec.get("environment", {}),
        }
        env.update({k: service.rewrite(str(v)) for k, v in values.items()})
        (service.root / "tmp").mkdir(exist_ok=True)
        return env

    def workdir(self, service: Service) -> Path:
        return REPO if service.app_image else service.root

    def _wrap(self, service: Service, argv: list[str]) -> list[str]:
        """Its namespaces; its read-only volumes (``:ro``) really read-only in its mount
        namespace, as Docker mounts them."""
        readonly = [
            str(volume).split(":")[0]
            for volume in service.spec.get("volumes", [])
            if str(volume).endswith(":ro")
        ]
        remount = "".join(
            f'mount --bind "{p}" "{p}" && mount -o remount,bind,ro "{p}" && ' for p in readonly
        )
        return ["ip", "netns", "exec", service.ns, "unshare", "--pid", "--fork", "--mount-proc",
                "--", "sh", "-c", f'{remount}exec "$@"', service.name, *argv]  # fmt: skip

    def start(self, key: str) -> Service:
        service = self.services[key]
        service.proc = self.procs.start(
            key,
            self._wrap(service, self.command(service)),
            service.root / "service.log",
            env=self.environment(service),
            cwd=self.workdir(service),
        )
        return service

    def run_once(self, key: str, extra: tuple[str, ...] = (), timeout: float = 600) -> str:
        """A one-shot service (restart: "no"): run it to its end; returns its output."""
        service = self.services[key]
        out = subprocess.run(
            self._wrap(service, self.command(service, extra)),
            capture_output=True,
            text=True,
            env=self.environment(service),
            cwd=self.workdir(service),
            timeout=timeout,
        )
        text = out.stdout + out.stderr
        (service.root / "service.log").write_text(text)
        if out.returncode != 0:
            raise AssertionError(f"{key} exited {out.returncode}: {text.strip()[-3000:]}")
        return text

    def healthy(self, key: str) -> bool:
        """Run the service's own healthcheck inside its namespaces, as Docker would."""
        service = self.services[key]
        test = service.spec.get("healthcheck", {}).get("test")
        if not test or service.proc is None:
            return True
        if service.proc.exited() is not None:
            raise AssertionError(f"{key} exited: {service.proc.last_line()}")
        children = descendants(service.proc.popen.pid)
        if not children:
            return False
        argv = self.local_argv(service, test[1:])
        out = subprocess.run(
            ["nsenter", "-t", str(children[0]), "-n", "-p", "-m",
             f"--wd={self.workdir(service)}", "--", *argv],
            capture_output=True,
            env=self.environment(service),
            timeout=30,
        )  # fmt: skip
        return out.returncode == 0

    def wait_healthy(self, key: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(key):
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} not healthy within {timeout}s")
            time.sleep(0.5)

    def up(self, project: str) -> None:
        """Start a project's long-running services in dependency order, honouring each
        depends_on condition (completed one-shots run first, healthy ones are waited for)."""
        done: set[str] = set()
        names = [
            s.name
            for s in self.services.values()
            if s.project == project and not s.spec.get("profiles")  # as `docker compose up`
        ]

        def bring(name: str) -> None:
            if name in done:
                return
            service = self.services[f"{project}/{name}"]
            for dep, rule in service.spec.get("depends_on", {}).items():
                bring(dep)
                if rule.get("condition") == "service_healthy":
                    self.wait_healthy(f"{project}/{dep}")
            if service.spec.get("restart", "no") == "no":
                self.run_once(f"{project}/{name}")
            else:
                self.start(f"{project}/{name}")
            done.add(name)

        for name in names:
            bring(name)

    # --------------------------------------------------------------------------- teardown
    def close(self) -> list[int]:
        leftovers = self.procs.stop()
        for service in self.services.values():
            subprocess.run(["ip", "netns", "del", service.ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / service.ns, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True, timeout=30)
        return leftovers
