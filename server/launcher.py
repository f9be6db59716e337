"""Run a federation on this machine with Flower's own deployment engine or simulation engine.

Deployment (``federation.mode=deployment``): one ``flower-superlink`` and one
``flower-supernode`` per silo, separate processes talking gRPC over loopback; the app is
submitted with ``flwr run``. Simulation (``federation.mode=simulation``): a simulation
``flower-superlink`` runs the same apps on virtual SuperNodes. Both are torn down completely
on success, failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedalign.checkpoint import CHECKPOINT, load_resume
from fedalign.config import Silo, external_silos, silos
from fedalign.errors import FedalignError
from server.processes import ProcessSet, port_in_use, scripts_first_on_path
from server.submit import flower_bin, register_keys, submit, write_connection


class LaunchError(FedalignError):
    """The local federation could not be started or did not finish."""


SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def _node_config(values: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items()
    )


RUNTIME_BYTES = int(0.7 * 2**30)  # a silo runtime's PSS, measured: docs/performance.md


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def exit_text(proc: Any) -> str:
    """``<name> exited with signal 9 (SIGKILL) (log: ...)``, or with its code and, then only,
    its last log line (a process killed by a signal wrote nothing about it)."""
    code = proc.exited()
    if code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"{proc.name} exited with signal {-code}{name} (log: {proc.log_path})"
    return f"{proc.name} exited with code {code}: {proc.last_line()} (log: {proc.log_path})"


class LocalFederation:
    """A SuperLink and its SuperNodes (or a simulation SuperLink) for one run.

    Parameters
    ----------
    cfg : DictConfig
        The resolved, validated run config.
    run_dir : Path
        The run folder; process logs go to ``run_dir/logs``.
    echo : callable
        Prints a progress line for the user.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, echo: Any = print) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.echo = echo
        self.fed = cfg.federation
        self.simulation = self.fed.mode == "simulation"
        self.flwr_home = Path(tempfile.mkdtemp(prefix="fedalign-flwr-"))
        env = scripts_first_on_path(os.environ)
        env.update(
            FLWR_HOME=str(self.flwr_home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PYTHONUNBUFFERED="1",
        )
        poll = OmegaConf.select(cfg, "federation.superexec_poll", default=None)
        if poll is not None:  # how often each executor asks for a new task (Flower: 1 s)
            env[SUPEREXEC_POLL_ENV] = str(float(poll))
        self.procs = ProcessSet(env=env)
        self.tls = bool(OmegaConf.select(cfg, "federation.tls", default=False))
        self.auth = bool(OmegaConf.select(cfg, "federation.auth", default=False))
        self.certs: dict[str, Path] = {}
        self.runtimes: list[tuple[str, Path, Any]] = []  # (domain, folder, process) started
        # one warm runtime per silo (client/silo_runtime.py); false: Flower's cold ClientApps
        self.warm = not self.simulation and bool(
            OmegaConf.select(cfg, "federation.silo_runtime", default=True)
        )

    # ------------------------------------------------------------------------- security
    def prepare_certificates(self) -> None:
        """Check ``federation.certs_dir`` (or make a throw-away one) when TLS is on."""
        from server.certs import check_certificates, make_certificates

        domains = [s.domain for s in silos(self.cfg)]
        chosen = OmegaConf.select(self.cfg, "federation.certs_dir")
        if chosen:
            self.certs = check_certificates(Path(chosen), domains, self.auth, str(self.fed.host))
        else:  # a fresh CA for this run only, deleted with FLWR_HOME
            folder = self.flwr_home / "certs"
            make_certificates(folder, domains, sans=[str(self.fed.host), "localhost"])
            self.certs = check_certificates(folder, domains, self.auth)

    def security_args(self) -> list[str]:
        """The SuperLink's TLS and authentication flags."""
        if not self.tls:
            return ["--insecure"]
        args = ["--ssl-ca-certfile", str(self.certs["ca"])]
        args += ["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
        return args + (["--enable-supernode-auth"] if self.auth else [])

    def register_silos(self) -> None:
        """Register every silo's public key with the SuperLink (``flwr supernode register``)."""
        keys = [self.certs[f"silo-pub:{silo.domain}"] for silo in silos(self.cfg)]
        register_keys(keys, self.procs.env)

    # ---------------------------------------------------------------------------- start
    def ports(self) -> dict[str, int]:
        ports = {"SuperLink control (federation.control_port)": int(self.fed.control_port)}
        if not self.simulation:
            ports["SuperLink fleet (federation.fleet_port)"] = int(self.fed.fleet_port)
            for i, silo in enumerate(silos(self.cfg)):
                if silo.domain not in external_silos(self.cfg):
                    ports[f"SuperNode {silo.domain} (federation.supernode_ports_from+{i})"] = (
                        int(self.fed.supernode_ports_from) + i
                    )
        return ports

    def check_ports(self) -> None:
        for what, port in self.ports().items():
            if port_in_use(self.fed.host, port):
                raise LaunchError(
                    f"port {port} on {self.fed.host} is already in use ({what}); stop the "
                    f"process holding it (`ss -ltnp | grep {port}`) or choose another port"
                )

    def start(self) -> None:
        self.check_ports()
        if self.tls:
            self.prepare_certificates()
        host, control = self.fed.host, int(self.fed.control_port)
        write_connection(
            self.flwr_home, f"{host}:{control}", self.certs["ca"] if self.tls else None
        )
        argv = [
            flower_bin("flower-superlink"),
            *self.security_args(),
            "--disable-runtime-dependency-installation",
            "--host",
            host,
            "--port",
            str(control),
        ]
        if self.simulation:
            argv += ["--simulation"]
        else:
            argv += ["--fleet-api-address", f"{host}:{int(self.fed.fleet_port)}"]
        superlink = self.procs.start("superlink", argv, self.logs / "superlink.log")
        self._wait_healthy(superlink, host, control)
        self.echo(
            f"SuperLink up on {host}:{control}"
            + ("" if self.simulation else f" (Fleet gRPC {host}:{int(self.fed.fleet_port)})")
            + (" with TLS" if self.tls else "")
            + (" and SuperNode authentication" if self.auth else "")
        )
        if self.auth:
            self.register_silos()
        if self.simulation:
            return
        external = external_silos(self.cfg)
        if self.warm:
            self.warm = self.runtimes_fit(len(silos(self.cfg)) - len(external))
        for i, silo in enumerate(silos(self.cfg)):
            if silo.domain in external:
                self.echo(
                    f"silo {silo.domain} ({silo.role}) joins from elsewhere: `fedalign silo join "
                    f"--superlink {self.fed.host}:{int(self.fed.fleet_port)} --domain "
                    f"{silo.domain} --role {silo.role} --data <its folder> ...`"
                )
                continue
            supernode = self.procs.start(
                f"silo-{silo.domain}",
                self.supernode_argv(i, silo),
                self.logs / f"silo-{silo.domain}.log",
            )
            self.echo(f"SuperNode for silo {silo.domain} ({silo.role}) started")
            if self.warm:
                self.start_runtime(silo, supernode.popen.pid)
        if self.warm:
            self.wait_runtimes()

    def runtimes_fit(self, count: int) -> bool:
        """Whether ``count`` silo runtimes fit in this machine's free memory (each holds torch
        and its data, ~0.7 GiB: docs/performance.md); if not, the silos work cold."""
        needed = count * RUNTIME_BYTES
        free = available_memory()
        if free is None or needed <= 0.8 * free:
            return True
        self.echo(
            f"warning: {count} silo runtimes would hold about {needed / 2**30:.0f} GiB and "
            f"{free / 2**30:.0f} GiB are free: the silos work cold (a fresh process per "
            "message); federation.silo_runtime=false says so without this warning"
        )
        return False

    def runtime_dir(self, silo: Silo) -> Path:
        """Silo ``silo``'s runtime folder: inside this run's own short-lived FLWR_HOME."""
        return self.flwr_home / "runtime" / silo.domain

    def start_runtime(self, silo: Silo, supernode_pid: int) -> None:
        """The silo's warm runtime (``client/silo_runtime.py``); it exits with its SuperNode."""
        folder = self.runtime_dir(silo)
        argv = [sys.executable, "-m", "client.silo_runtime", "--dir", str(folder)]
        argv += ["--watch-pid", str(supernode_pid)]
        log = self.logs / f"runtime-{silo.domain}.log"
        self.runtimes.append(
            (silo.domain, folder, self.procs.start(f"runtime-{silo.domain}", argv, log))
        )

    def wait_runtimes(self) -> None:
        """Wait until every silo runtime listens (its socket exists: it binds before it warms
        up, and a ClientApp that connects meanwhile waits for the warm-up, so the run is
        submitted while torch loads); one that does not in time leaves its silo's ClientApps
        to do the work cold, as each of them logs."""
        from client.warm import SOCKET

        deadline = time.monotonic() + float(self.fed.startup_timeout)
        waiting = list(self.runtimes)
        while waiting and time.monotonic() < deadline:
            for domain, folder, proc in list(waiting):
                if (folder / SOCKET).exists():
                    waiting.remove((domain, folder, proc))
                elif proc.exited() is not None:
                    proc.reported = True
                    self.echo(f"warning: {exit_text(proc)}; silo {domain} works cold")
                    waiting.remove((domain, folder, proc))
            time.sleep(0.1)
        if waiting:
            names = ", ".join(proc.name for _, _, proc in waiting)
            self.echo(f"warning: {names} not ready within {self.fed.startup_timeout}s")
        else:
            self.echo("silo runtimes listening: every silo handles its messages warm")

    def supernode_argv(self, index: int, silo: Silo) -> list[str]:
        """The ``flower-supernode`` command line of silo ``index``."""
        node_config: dict[str, Any] = {
            "domain": silo.domain,
            "role": silo.role,
            "threads": int(self.fed.threads_per_silo),
        }
        if self.cfg.data.cache_dir:
            node_config["data-dir"] = str(self.cfg.data.cache_dir)
        if self.warm:
            node_config["runtime-dir"] = str(self.runtime_dir(silo))
        security = ["--insecure"]
        if self.tls:
            security = ["--root-certificates", str(self.certs["ca"])]
        if self.auth:
            security += ["--auth-supernode-private-key", str(self.certs[f"silo:{silo.domain}"])]
        return [
            flower_bin("flower-supernode"),
            *security,
            "--superlink",
            f"{self.fed.host}:{int(self.fed.fleet_port)}",
            "--node-config",
            _node_config(node_config),
            "--host",
            self.fed.host,
            "--port",
            str(int(self.fed.supernode_ports_from) + index),
        ]

    def _wait_healthy(self, proc: Any, host: str, port: int) -> None:
        deadline = time.monotonic() + float(self.fed.startup_timeout)
        while time.monotonic() < deadline:
            if proc.exited() is not None:  # a signal: no log line; a code: its last line
                raise LaunchError(exit_text(proc).replace(proc.name, "the SuperLink", 1))
            scheme, context = "http", None
            if self.tls:
                scheme, context = "https", ssl.create_default_context(cafile=self.certs["ca"])
            try:
                url = f"{scheme}://{host}:{port}/health"
                with urllib.request.urlopen(url, timeout=1, context=context) as reply:
                    if reply.status == 200:
                        return
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, ssl.SSLError):  # up, but the handshake failed
                    raise LaunchError(
                        f"TLS handshake with the SuperLink at {host}:{port} failed "
                        f"({getattr(exc.reason, 'verify_message', None) or exc.reason}); check "
                        f"that {self.certs['cert']} was signed by {self.certs['ca']} and names "
                        f"{host} (log: {proc.log_path})"
                    ) from None
            except OSError:
                pass
            time.sleep(0.2)
        raise LaunchError(
            f"the SuperLink did not become healthy within {self.fed.startup_timeout}s "
            f"(log: {proc.log_path})"
        )

    # --------------------------------------------------------------------------- submit
    def submit(self, verbose: bool = False) -> str:
        """``flwr run`` the app, stream its log, return the run's final Flower status."""
        extra: tuple[str, ...] = ()
        if self.simulation:
            extra = (
                "--federation-config",
                f"num_supernodes={len(silos(self.cfg))} "
                f"client_resources_num_cpus={int(self.fed.cpus_per_silo)}",
            )
        _, status = submit(
            self.cfg,
            self.procs.env,
            self.run_dir,
            self.logs / "server.log",
            echo=self.echo,
            verbose=verbose,
            extra_args=extra,
            on_line=self._check_nodes_alive,
        )
        return status

    def _check_nodes_alive(self) -> None:
        for proc in self.procs.processes:
            if proc.exited() is not None and not proc.reported:
                proc.reported = True
                self.echo(f"warning: {exit_text(proc)}")

    def crash(self) -> str | None:
        """Why the run cannot have finished: the SuperLink exited before it was stopped."""
        superlink = next((p for p in self.procs.processes if p.name == "superlink"), None)
        if superlink is None or superlink.exited() is None:
            return None
        return exit_text(superlink).replace("superlink", "the SuperLink", 1)

    # ------------------------------------------------------------------------- teardown
    def stop(self) -> None:
        leftovers = self.procs.stop()
        shutil.rmtree(self.flwr_home, ignore_errors=True)
        if leftovers:
            self.echo(f"warning: processes {leftovers} did not exit")

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resumable_run(cfg: DictConfig) -> Path:
    """For ``resume``: the folder ``resume=<run folder>`` or ``output.run_dir`` names, else
    (``resume=true``) the unfinished run under ``output.root`` whose checkpoint is newest."""
    chosen = OmegaConf.select(cfg, "output.run_dir")
    if not isinstance(cfg.resume, bool):
        chosen = str(cfg.resume)
    if chosen:
        return Path(chosen)
    candidates = sorted(
        Path(cfg.output.root).glob(f"*/{CHECKPOINT}"), key=lambda p: p.stat().st_mtime
    )
    for path in reversed(candidates):
        summary = path.parent / "summary.json"
        if not summary.exists() or json.loads(summary.read_text()).get("status") != "completed":
            return path.parent
    raise LaunchError(
        f"resume=true: no unfinished run with a {CHECKPOINT} under {cfg.output.root}/; "
        "give resume=<run folder> or start a new run"
    )


def keep_log(path: Path) -> None:
    """Move ``path`` (an earlier attempt's log) aside to ``<stem>.<n><suffix>``, n = 1, 2..."""
    if path.exists():
        n = 1
        while path.with_name(f"{path.stem}.{n}{path.suffix}").exists():
            n += 1
        path.rename(path.with_name(f"{path.stem}.{n}{path.suffix}"))


def launch(cfg: DictConfig, run_dir: Path, echo: Any = print) -> dict[str, Any]:
    """Run ``cfg`` on a local federation; returns summary.json's content. With ``resume``,
    the run folder's checkpoint is verified before anything starts."""
    run_dir = run_dir.resolve()
    OmegaConf.update(cfg, "output.run_dir", str(run_dir), force_add=True)
    if bool(OmegaConf.select(cfg, "resume", default=False)):
        state, _ = load_resume(cfg, run_dir)
        echo(f"resuming {run_dir} after round {state['round']} of {cfg.rounds} ({CHECKPOINT})")
        keep_log(run_dir / "logs" / "server.log")  # the earlier attempt's, as server.1.log
    from fedalign.runlog import mark_summary

    try:
        with LocalFederation(cfg, run_dir, echo) as federation:
            federation.start()
            verbose = bool(OmegaConf.select(cfg, "verbose", default=False))
            status = federation.submit(verbose=verbose)
            crash = federation.crash()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; the federation is down by now
        if run_dir.is_dir():  # also before the ServerApp wrote a summary.json
            mark_summary(run_dir, "interrupted", "interrupted by Ctrl-C or SIGTERM")
        raise
    if crash:
        mark_summary(run_dir, "failed", crash)
        raise LaunchError(f"run failed: {crash}; continue it with `fedalign run resume={run_dir}`")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("status") != "completed":
        reason = summary.get("error") or f"Flower run status {status}"
        raise LaunchError(f"run failed: {reason} (logs: {run_dir / 'logs'})")
    return summary
