"""Certificates for a secure federation: a CA, the SuperLink's certificate, one key per silo.

Layout of the folder ``fedalign certs DIR`` writes (private keys are mode 0600):

- ``ca.crt`` / ``ca.key``: the federation's own certificate authority. ``ca.crt`` goes to every
  silo (``--root-certificates``); ``ca.key`` stays with whoever runs the SuperLink.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate, signed by the CA, with
  a subjectAltName for every address silos use to reach it (``--san``).
- ``silos/<domain>`` / ``silos/<domain>.pub``: each silo's OpenSSH ECDSA P-384 key pair, Flower
  1.39's SuperNode authentication. The private key goes to that silo only; the public key is
  registered on the SuperLink with ``flwr supernode register``.

Existing files are never overwritten: a second call adds missing silos and refuses to change
a CA or SuperLink certificate that is already there.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedalign import atomic
from fedalign.errors import FedalignError

DEFAULT_SANS = ("127.0.0.1", "::1", "localhost")
VALID_DAYS = 365
PRIVATE = 0o600  # keys: readable by this user alone


class CertificateError(FedalignError):
    """Certificates could not be made or are not usable."""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not HOSTNAME.match(name):
            raise CertificateError(
                f"certs: --san {name!r} is neither an IP address nor a DNS name"
            ) from None
        return x509.DNSName(name)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    sans: Iterable[str] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    is_ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if is_ca else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_certificates(
    out: Path, silos: Iterable[str], sans: Iterable[str] = DEFAULT_SANS
) -> dict[str, Path]:
    """Create (or complete) the folder described in the module doc; returns the main paths."""
    out = Path(out)
    sans = list(sans)
    if not sans:
        raise CertificateError("certs: give at least one --san (an address silos connect to)")
    for name in sans:  # every name is checked before any file is written
        _san(name)
    (out / "silos").mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": out / "ca.crt",
        "ca_key": out / "ca.key",
        "cert": out / "superlink.crt",
        "key": out / "superlink.key",
    }
    if paths["ca"].exists() != paths["ca_key"].exists():
        raise CertificateError(f"certs: {out} has only one of ca.crt and ca.key; remove it")
    if not paths["ca"].exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca = _certificate("fedalign federation CA", ca_key)
        atomic.write_bytes(paths["ca_key"], _key_pem(ca_key), mode=PRIVATE)
        atomic.write_bytes(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    ca, ca_key = load_ca(out)
    if not paths["cert"].exists():
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _certificate("fedalign superlink", key, ca.subject, ca_key, sans)
        atomic.write_bytes(paths["key"], _key_pem(key), mode=PRIVATE)
        atomic.write_bytes(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    for silo in silos:
        private = out / "silos" / silo
        if private.exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        atomic.write_bytes(
            private,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            mode=PRIVATE,
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        atomic.write_bytes(private.with_name(f"{silo}.pub"), public + b"\n")
    return paths


def load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in ``out``; a clear error if they are unreadable."""
    try:
        ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"certs: cannot read the CA in {out}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"certs: {out / 'ca.key'} is not an EC key made by fedalign certs")
    return ca, key


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The IP addresses and DNS names a certificate's subjectAltName holds."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] + list(
        sans.get_values_for_type(x509.DNSName)
    )


def _names_host(names: list[str], host: str) -> bool:
    try:
        wanted = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in {n.lower() for n in names}
    return any(n == str(wanted) for n in names)


def check_certificates(
    out: Path, silos: Iterable[str], auth: bool, host: str | None = None
) -> dict[str, Path]:
    """The files a secure federation needs, checked before any process starts.

    Parameters
    ----------
    out : Path
        A ``fedalign certs`` folder.
    silos : iterable of str
        The silos whose keys are needed (with ``auth``).
    auth : bool
        SuperNode authentication: each silo's key pair must be there.
    host : str, optional
        The address the SuperLink is reached at (``federation.host``): the SuperLink's
        certificate must name it, else every TLS handshake would fail.

    Returns
    -------
    dict of str to Path
        ``ca``, ``cert``, ``key`` and, with ``auth``, ``silo:<name>`` / ``silo-pub:<name>``.
    """
    out = Path(out)
    needed = {
        "ca": out / "ca.crt",
        "cert": out / "superlink.crt",
        "key": out / "superlink.key",
    }
    if auth:
        for silo in silos:
            needed[f"silo:{silo}"] = out / "silos" / silo
            needed[f"silo-pub:{silo}"] = out / "silos" / f"{silo}.pub"
    missing = [str(p) for p in needed.values() if not p.is_file()]
    if missing:
        raise CertificateError(
            f"federation: missing {', '.join(missing)}; create them with `fedalign certs {out}`"
        )
    try:
        ca = x509.load_pem_x509_certificate(needed["ca"].read_bytes())
        cert = x509.load_pem_x509_certificate(needed["cert"].read_bytes())
    except ValueError:
        raise CertificateError(
            f"federation: {needed['ca']} or {needed['cert']} is not a PEM certificate; "
            f"recreate the folder with `fedalign certs`"
        ) from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"federation: {needed['cert']} was not signed by {needed['ca']}; use the files of "
            f"one `fedalign certs` folder"
        ) from None
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise CertificateError(f"federation: {needed['cert']} expired; run `fedalign certs` again")
    names = certificate_names(cert)
    if host is not None and not _names_host(names, host):
        raise CertificateError(
            f"federation: {needed['cert']} is for {', '.join(names) or 'no address'}, not "
            f"federation.host={host}, so the TLS handshake would fail; make a new folder with "
            f"`fedalign certs DIR --san {host}` or set federation.host to one of those"
        )
    return needed
