"""The bad-input sweep: every case is run through the real ``fedalign`` command and must print
exactly one ``error:`` line (no traceback), exit non-zero and start no Flower process.
docs/bad-inputs.md lists the same cases with the line each one gets."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedalign import checkpoint
from fedalign.checkpoint import identity
from fedalign.config import compose
from fedalign.data.feature_shift import write_feature_shift
from server.certs import check_certificates, make_certificates
from server.launcher import LaunchError, LocalFederation
from server.processes import carrying, free_port
from tests.conftest import port_overrides

FEDALIGN = str(Path(sys.executable).parent / "fedalign")
DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"


def prepare(tmp: Path, cache: Path) -> dict[str, str]:
    """Files the cases point at: checkpoints and certificate folders gone wrong."""
    corrupt = tmp / "corrupt-run"
    checkpoint.save(corrupt / "checkpoint.npz", {"round": 1}, {"arrays": {"w": np.ones(3)}})
    raw = bytearray((corrupt / "checkpoint.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (corrupt / "checkpoint.npz").write_bytes(bytes(raw))
    other = tmp / "other-config-run"
    checkpoint.save(other / "checkpoint.npz", {"round": 1, "config": "{}"}, {})
    make_certificates(tmp / "certs-a", ["mnist"])
    make_certificates(tmp / "certs-b", ["mnist"])
    (tmp / "certs-a" / "ca.crt").write_bytes((tmp / "certs-b" / "ca.crt").read_bytes())
    (tmp / "a-file").write_text("not a folder")
    domains = ["mnist", "usps", "mnistm"]
    make_certificates(tmp / "certs-remote", domains, sans=["10.0.0.5"])  # no loopback name
    saved = tmp / "saved-run"
    cfg = compose([f"data.cache_dir={cache}", "data.domains=[mnist,usps,mnistm]"])
    saved.mkdir()
    (saved / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    checkpoint.save(saved / "checkpoint.npz", {"round": 1, "config": identity(cfg)}, {})
    site = write_feature_shift(tmp / "features")["inverted"].parent
    return {
        "remote": str(tmp / "certs-remote"),
        "saved": str(saved),
        "site": str(site),
        "corrupt": str(corrupt),
        "other": str(other),
        "foreign": str(tmp / "certs-a"),
        "empty": str(tmp / "empty"),
        "file": str(tmp / "a-file"),
        "data": f"data.cache_dir={cache} data.domains=[mnist,usps,mnistm]",
    }


# (case, the exit code docs/bad-inputs.md gives it (2: a config or usage error the command line
# can fix, 1: a failure at run time), fedalign arguments with {placeholders}, the expected
# part of the one error line)
CASES = [
    ("unknown config key", 2, "run foo=1", "config: unknown key 'foo'"),
    ("unknown group option", 2, "run strategy=bogus", "Could not find 'strategy/bogus'"),
    ("value of the wrong type", 2, "run train.lr=fast", "train.lr='fast' is not a number"),
    ("non-integer seed", 2, "run seed=1.5", "seed=1.5 is not an integer"),
    ("out-of-range value", 2, "run rounds=0", "rounds must be >= 1"),
    ("unknown domain", 2, "run data.target=kmnist", "data.target='kmnist' is not one of"),
    ("unknown data source", 2, "run data.source=imagenet", "data.source='imagenet' (known"),
    ("unknown device", 2, "run device=tpu", "device='tpu'"),
    (
        "robust aggregation with Fisher merging",
        2,
        "run strategy=fisher updates.robust=median",
        "merges by Fisher",
    ),
    ("authentication without TLS", 2, "run federation.auth=true", "needs federation.tls=true"),
    (
        "TLS in the simulation",
        2,
        "simulate +federation.tls=true",
        "federation.tls applies to a deployment",
    ),
    (
        "data cache that is not a folder",
        1,
        "run data.cache_dir={file}/x",
        "set data.cache_dir to a folder this user can write",
    ),
    (
        "TLS with a certificate folder that is missing",
        1,
        "run federation.tls=true federation.certs_dir={empty} {data} {ports}",
        "create them with `fedalign certs",
    ),
    (
        "TLS with a SuperLink certificate from another CA",
        1,
        "run federation.tls=true federation.certs_dir={foreign} {data} {ports}",
        "was not signed by",
    ),
    (
        "certificate for an invalid address",
        1,
        "certs {empty}/certs --san bad_name!",
        "neither an IP address nor a DNS name",
    ),
    (
        "resume with no run to resume",
        1,
        "run resume=true output.root={empty} {data}",
        "resume=true: no unfinished run with a checkpoint.npz under",
    ),
    (
        "resume with an override that changes the run",
        1,
        "run resume={saved} rounds=7 {data}",
        "resume: rounds=7 would change the run in",
    ),
    (
        "output folder that cannot exist",
        2,
        "run output.root=/proc/nope",
        "output: cannot write to /proc/nope (No such file or directory); set output.root",
    ),
    (
        "read-only output root",
        2,
        "run output.root=/sys/kernel",
        "output: cannot write to /sys/kernel (Permission denied); set output.root",
    ),
    (
        "run folder on a read-only filesystem",
        2,
        "run output.run_dir=/sys/fedalign-run",
        "output: cannot write to /sys/fedalign-run (Operation not permitted); set output.run_dir",
    ),
    (
        "TLS with a SuperLink certificate for another address",
        1,
        "run federation.tls=true federation.certs_dir={remote} {data} {ports}",
        "superlink.crt is for 10.0.0.5, not federation.host=127.0.0.1, so the TLS handshake "
        "would fail",
    ),
    (
        "join an address without a port",
        2,
        "silo join --superlink 127.0.0.1 --domain site --data {empty} --insecure --dry-run",
        "silo join: --superlink '127.0.0.1': it is not HOST:PORT or [IPv6]:PORT",
    ),
    (
        "join an IPv6 address that is not one",
        2,
        "silo join --superlink [fe80::zz]:9092 --domain site --data {empty} --insecure --dry-run",
        "silo join: --superlink '[fe80::zz]:9092': fe80::zz is not an IPv6 address",
    ),
    (
        "join a SuperLink nobody runs",
        1,
        "silo join --superlink 127.0.0.1:{closed} --domain inverted --data {site} --insecure "
        "--connect-timeout 2 --port {free}",
        "within 2s (connection refused); check that the SuperLink is running",
    ),
    (
        "resume from a corrupt checkpoint",
        1,
        "run resume=true output.run_dir={corrupt} {data}",
        "is unreadable (BadZipFile); it was not loaded",
    ),
    (
        "resume with a different config",
        1,
        "run resume=true output.run_dir={other} {data}",
        "was written with a different config",
    ),
    (
        "submit to a SuperLink nobody runs",
        1,
        "submit --superlink 127.0.0.1:{closed} rounds=1",
        "Connection to the SuperLink is unavailable",
    ),
    (
        "submit that waits for a SuperLink nobody runs",
        1,
        "submit --superlink 127.0.0.1:{closed} --wait 1 rounds=1",
        "did not accept connections within 1s",
    ),
    (
        "submit with a CA certificate that is missing",
        2,
        "submit --superlink 127.0.0.1:{closed} --root-certificates {empty}/ca.crt",
        "CA certificate",
    ),
    (
        "register a silo key that is missing",
        2,
        "register --superlink 127.0.0.1:{closed} {empty}/usps.pub",
        "register: no silo public key at",
    ),
    (
        "per-silo data without a folder",
        2,
        "data build --per-silo",
        "data build --per-silo needs --cache-dir DIR",
    ),
    (
        "external silo that is not a domain",
        2,
        "run federation.external_silos=[kmnist]",
        "federation.external_silos has ['kmnist'], not in data.domains",
    ),
    (
        "join without a CA certificate",
        2,
        "silo join --superlink 127.0.0.1:{closed} --domain site --data {empty}",
        "give --root-certificates ca.crt (and --key), or --insecure",
    ),
    (
        "join a data folder that is missing",
        2,
        "silo join --superlink 127.0.0.1:{closed} --domain site --data {empty}/no-site --insecure",
        "no-site does not exist",
    ),
    ("unknown grid preset", 1, "grid nope", "grid: no preset 'nope'"),
    ("unknown command", 2, "train", "unknown command 'train'"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, digits_cache) -> dict[str, str]:
    return prepare(tmp_path_factory.mktemp("bad"), digits_cache)


@pytest.mark.parametrize(("case", "code", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_error_line(places, case, code, args, expected, tmp_path):
    marker = uuid.uuid4().hex
    closed, free = free_port(), free_port()  # nothing listens there
    ports = " ".join(port_overrides(3))
    argv = args.format(**places, ports=ports, closed=closed, free=free).split()
    done = subprocess.run(
        [FEDALIGN, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "FEDALIGN_TEST_MARK": marker},
        cwd=tmp_path,  # the default output.root, outputs/, would be made here
        timeout=120,
    )
    lines = [row for row in done.stderr.splitlines() if row.strip()]
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert carrying("FEDALIGN_TEST_MARK", marker) == []  # no process left behind
    for folder in (tmp_path, Path(places["empty"]).parent):
        assert list(folder.rglob(".hydra")) == [], "a refused run left its run folder"


def test_certs_always_include_the_loopback_names(tmp_path):
    done = subprocess.run(
        [FEDALIGN, "certs", str(tmp_path / "c"), "--san", "10.0.0.5", "--silo", "mnist"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "SANs: 127.0.0.1, ::1, localhost, 10.0.0.5" in done.stdout
    for host in ("127.0.0.1", "10.0.0.5", "localhost"):  # a local run and a remote silo
        check_certificates(tmp_path / "c", ["mnist"], auth=False, host=host)


@pytest.fixture
def no_proxy(monkeypatch) -> None:
    """urllib would send even a loopback request to a proxy named in the environment."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def federation(tmp_path) -> Iterator[LocalFederation]:
    """A TLS LocalFederation whose SuperLink is not started (the tests give _wait_healthy
    their own process or listener); its throw-away FLWR_HOME is removed afterwards."""
    cfg = compose(["federation.tls=true", "federation.startup_timeout=10"])
    with LocalFederation(cfg, tmp_path / "run", echo=lambda line: None) as fed:
        yield fed


@pytest.fixture
def tls_listener(tmp_path) -> Iterator[int]:
    """An HTTPS server on a free loopback port, its certificate from ``tmp_path/listener``
    (a CA of its own); yields the port."""
    paths = make_certificates(tmp_path / "listener", [])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths["cert"], paths["key"])
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_tls_handshake_failure_while_waiting_is_reported_at_once(
    federation, tls_listener, no_proxy, tmp_path
):
    """The SuperLink answers with a certificate from another CA: one line naming the
    handshake, not "did not become healthy within 10s"."""
    ours = make_certificates(tmp_path / "ours", [])  # the CA the launcher trusts
    federation.certs = {"ca": ours["ca"], "cert": ours["cert"], "key": ours["key"]}
    superlink = federation.procs.start(  # alive while it is asked; stopped with the federation
        "superlink",
        [sys.executable, "-c", "import signal; signal.pause()"],
        tmp_path / "superlink.log",
    )
    with pytest.raises(LaunchError) as caught:
        federation._wait_healthy(superlink, "127.0.0.1", tls_listener)
    line = str(caught.value)
    assert line.startswith(
        f"TLS handshake with the SuperLink at 127.0.0.1:{tls_listener} failed ("
    ), line
    assert f"check that {ours['cert']} was signed by {ours['ca']} and names 127.0.0.1" in line
    assert superlink.exited() is None  # reported while it runs: not a start-up timeout
    assert "TLS handshake with the SuperLink at 127.0.0.1:9093 failed" in DOC.read_text()


def test_superlink_killed_during_start_up_quotes_no_log_line(federation, tmp_path):
    """A SuperLink killed by a signal wrote nothing about it: its last log line is unrelated."""
    log = tmp_path / "superlink.log"
    superlink = federation.procs.start(
        "superlink",
        [
            sys.executable,
            "-c",
            "import os, signal; print('INFO: an unrelated line', flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)",
        ],
        log,
    )
    superlink.popen.wait(timeout=30)
    with pytest.raises(LaunchError) as caught:
        federation._wait_healthy(superlink, "127.0.0.1", free_port())
    assert str(caught.value) == f"the SuperLink exited with signal 9 (SIGKILL) (log: {log})"
    assert "unrelated" in log.read_text()  # it was there to be quoted


def doc_rows() -> dict[str, list[str]]:
    """The cells of each row of docs/bad-inputs.md's sweep table, by its first cell."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 4:  # bad input | command | exit | the line
            rows[cells[0]] = cells
    return rows


def test_every_case_is_in_the_docs():
    text, rows = DOC.read_text(), doc_rows()
    for case, code, _, expected in CASES:
        assert case in text and expected.replace("`", "") in text.replace("`", ""), case
        assert rows[case][2] == str(code), (case, rows[case][2], code)  # the exit column
