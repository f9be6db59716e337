"""The bad-input sweep: every case is run through the real ``fedalign`` command and must print
exactly one ``error:`` line (no traceback), exit non-zero and start no Flower process.
docs/bad-inputs.md lists the same cases with the line each one gets."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedalign import checkpoint
from fedalign.config import compose
from fedalign.data.feature_shift import write_feature_shift
from server.app import identity
from server.certs import check_certificates, make_certificates
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


# (case, fedalign arguments with {placeholders}, the expected part of the one error line)
CASES = [
    ("unknown config key", "run foo=1", "config: unknown key 'foo'"),
    ("unknown group option", "run strategy=bogus", "Could not find 'strategy/bogus'"),
    ("value of the wrong type", "run train.lr=fast", "train.lr='fast' is not a number"),
    ("non-integer seed", "run seed=1.5", "seed=1.5 is not an integer"),
    ("out-of-range value", "run rounds=0", "rounds must be >= 1"),
    ("unknown domain", "run data.target=kmnist", "data.target='kmnist' is not one of"),
    ("unknown data source", "run data.source=imagenet", "data.source='imagenet' (known"),
    ("unknown device", "run device=tpu", "device='tpu'"),
    (
        "robust aggregation with Fisher merging",
        "run strategy=fisher updates.robust=median",
        "merges by Fisher",
    ),
    ("authentication without TLS", "run federation.auth=true", "needs federation.tls=true"),
    (
        "TLS in the simulation",
        "simulate +federation.tls=true",
        "federation.tls applies to a deployment",
    ),
    (
        "data cache that is not a folder",
        "run data.cache_dir={file}/x",
        "set data.cache_dir to a folder this user can write",
    ),
    (
        "TLS with a certificate folder that is missing",
        "run federation.tls=true federation.certs_dir={empty} {data} {ports}",
        "create them with `fedalign certs",
    ),
    (
        "TLS with a SuperLink certificate from another CA",
        "run federation.tls=true federation.certs_dir={foreign} {data} {ports}",
        "was not signed by",
    ),
    (
        "certificate for an invalid address",
        "certs {empty}/certs --san bad_name!",
        "neither an IP address nor a DNS name",
    ),
    (
        "resume with no run to resume",
        "run resume=true output.root={empty} {data}",
        "resume=true: no unfinished run with a checkpoint.npz under",
    ),
    (
        "resume with an override that changes the run",
        "run resume={saved} rounds=7 {data}",
        "resume: rounds=7 would change the run in",
    ),
    (
        "output folder that cannot exist",
        "run output.root=/proc/nope",
        "output: cannot write to /proc/nope (No such file or directory); set output.root",
    ),
    (
        "read-only output root",
        "run output.root=/sys/kernel",
        "output: cannot write to /sys/kernel (Permission denied); set output.root",
    ),
    (
        "run folder on a read-only filesystem",
        "run output.run_dir=/sys/fedalign-run",
        "output: cannot write to /sys/fedalign-run (Operation not permitted); set output.run_dir",
    ),
    (
        "TLS with a SuperLink certificate for another address",
        "run federation.tls=true federation.certs_dir={remote} {data} {ports}",
        "superlink.crt is for 10.0.0.5, not federation.host=127.0.0.1, so the TLS handshake "
        "would fail",
    ),
    (
        "join an address without a port",
        "silo join --superlink 127.0.0.1 --domain site --data {empty} --insecure --dry-run",
        "silo join: --superlink '127.0.0.1': it is not HOST:PORT or [IPv6]:PORT",
    ),
    (
        "join an IPv6 address that is not one",
        "silo join --superlink [fe80::zz]:9092 --domain site --data {empty} --insecure --dry-run",
        "silo join: --superlink '[fe80::zz]:9092': fe80::zz is not an IPv6 address",
    ),
    (
        "join a SuperLink nobody runs",
        "silo join --superlink 127.0.0.1:{closed} --domain inverted --data {site} --insecure "
        "--connect-timeout 2 --port {free}",
        "within 2s (connection refused); check that the SuperLink is running",
    ),
    (
        "resume from a corrupt checkpoint",
        "run resume=true output.run_dir={corrupt} {data}",
        "is unreadable (BadZipFile); it was not loaded",
    ),
    (
        "resume with a different config",
        "run resume=true output.run_dir={other} {data}",
        "was written with a different config",
    ),
    (
        "submit to a SuperLink nobody runs",
        "submit --superlink 127.0.0.1:{closed} rounds=1",
        "Connection to the SuperLink is unavailable",
    ),
    (
        "submit with a CA certificate that is missing",
        "submit --superlink 127.0.0.1:{closed} --root-certificates {empty}/ca.crt",
        "CA certificate",
    ),
    (
        "register a silo key that is missing",
        "register --superlink 127.0.0.1:{closed} {empty}/usps.pub",
        "register: no silo public key at",
    ),
    (
        "per-silo data without a folder",
        "data build --per-silo",
        "data build --per-silo needs --cache-dir DIR",
    ),
    (
        "external silo that is not a domain",
        "run federation.external_silos=[kmnist]",
        "federation.external_silos has ['kmnist'], not in data.domains",
    ),
    (
        "join without a CA certificate",
        "silo join --superlink 127.0.0.1:{closed} --domain site --data {empty}",
        "give --root-certificates ca.crt (and --key), or --insecure",
    ),
    (
        "join a data folder that is missing",
        "silo join --superlink 127.0.0.1:{closed} --domain site --data {empty}/no-site --insecure",
        "no-site does not exist",
    ),
    ("unknown grid preset", "grid nope", "grid: no preset 'nope'"),
    ("unknown command", "train", "unknown command 'train'"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, digits_cache) -> dict[str, str]:
    return prepare(tmp_path_factory.mktemp("bad"), digits_cache)


@pytest.mark.parametrize(("case", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_error_line(places, case, args, expected, tmp_path):
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
    assert done.returncode != 0
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


def test_every_case_is_in_the_docs():
    text = DOC.read_text()
    for case, _, expected in CASES:
        assert case in text and expected.replace("`", "") in text.replace("`", ""), case
