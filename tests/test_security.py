"""TLS and SuperNode authentication: the certificate folder and its checks. A real federation
that refuses a plaintext SuperNode and one whose key was never registered: tests/test_join.py."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509

from fedalign.config import ConfigError, compose, validate
from server.certs import CertificateError, check_certificates, make_certificates


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_certs_folder_has_a_ca_a_superlink_certificate_and_silo_keys(tmp_path):
    paths = make_certificates(tmp_path, ["mnist", "usps"], sans=["10.0.0.5", "link.example"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example"]
    for private in (paths["ca_key"], paths["key"], tmp_path / "silos" / "mnist"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert (tmp_path / "silos" / "usps.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    make_certificates(tmp_path, ["mnist", "usps", "syn"])  # adds a silo, changes nothing else
    assert all(digest(p) == h for p, h in before.items())
    assert (tmp_path / "silos" / "syn.pub").is_file()


def test_certs_command_makes_a_key_for_every_silo_of_the_config(tmp_path, capsys):
    from cli.main import main

    main(["certs", str(tmp_path / "a"), "data.domains=[mnist,usps,mnistm]", "data.shards=2"])
    keys = sorted(p.name for p in (tmp_path / "a" / "silos").glob("*.pub"))
    assert keys == ["mnist.0.pub", "mnist.1.pub", "mnistm.pub", "usps.0.pub", "usps.1.pub"]
    with pytest.raises(SystemExit) as exited:
        main(["certs", str(tmp_path / "b"), "data.shards=0"])
    assert exited.value.code != 0
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "b").exists()  # nothing written for a config that does not hold


def test_missing_or_foreign_certificates_get_one_line(tmp_path):
    make_certificates(tmp_path / "a", ["mnist"])
    with pytest.raises(CertificateError, match=r"missing .*silos/usps\.pub; create them with"):
        check_certificates(tmp_path / "a", ["mnist", "usps"], auth=True)
    make_certificates(tmp_path / "b", ["mnist"])
    (tmp_path / "a" / "ca.crt").write_bytes((tmp_path / "b" / "ca.crt").read_bytes())
    with pytest.raises(CertificateError, match="was not signed by"):
        check_certificates(tmp_path / "a", ["mnist"], auth=False)
    (tmp_path / "a" / "ca.crt").write_text("not a certificate")
    with pytest.raises(CertificateError, match="is not a PEM certificate"):
        check_certificates(tmp_path / "a", ["mnist"], auth=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.auth=true"], "federation.auth=true needs federation.tls=true"),
        (["federation=simulation", "+federation.tls=true"], "applies to a deployment"),
    ],
)
def test_security_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(overrides))
