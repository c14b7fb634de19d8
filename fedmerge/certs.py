"""Credentials of a secure deployment: TLS certificates and SuperNode authentication keys.

One folder holds everything a deployment needs (docs/deployment.md)::

    ca.crt                      the CA every process trusts (its key, ca.key, signs the rest)
    superlink/server.{crt,key}  the SuperLink's TLS certificate (the SuperLink's host names)
    superlink/superexec.secret  shared by the SuperLink and the ServerApp's SuperExec
    supernode-X/auth.key        SuperNode X's authentication key (OpenSSH, EC P-384)
    supernode-X/auth.pub        its public key: registered with ``flwr supernode register``
    supernode-X/server.{crt,key}  TLS of SuperNode X's Runtime API, where its SuperExec connects
    supernode-X/superexec.secret  shared by SuperNode X and its SuperExec

Private keys are written with mode 0600. Each party gets only ``ca.crt`` and its own folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedmerge.errors import FedmergeError

CURVE = ec.SECP384R1()
"""Every key's curve (Flower accepts NIST curves for SuperNode keys)."""


@dataclass(frozen=True)
class Issued:
    """What :func:`issue` wrote: the folder, and the SuperNodes' public keys to register."""

    out: Path
    public_keys: dict[str, Path]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(host: str) -> x509.GeneralName:
    """A subject alternative name: an IP address when `host` is one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    hosts: list[str],
    days: int,
) -> x509.Certificate:
    """A certificate for `key`: the CA's own (`issuer` None) or a server's, signed by `issuer`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        return builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        ).sign(key, hashes.SHA384())
    return (
        builder.add_extension(
            x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(issuer[1], hashes.SHA384())
    )


def _server(
    folder: Path,
    subject: str,
    hosts: list[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    days: int,
) -> None:
    """A TLS server certificate and key for `hosts`, and the folder's SuperExec secret."""
    key = ec.generate_private_key(CURVE)
    cert = _certificate(subject, key, ca, hosts, days)
    _write(folder / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "server.key", _pem_key(key), private=True)
    _write(folder / "superexec.secret", secrets.token_hex(32).encode(), private=True)


def issue(
    out: Path, superlink_hosts: list[str], supernodes: dict[str, list[str]], days: int = 365
) -> Issued:
    """Write a deployment's credentials to `out` (see the module docstring).

    Parameters
    ----------
    out : Path
        A folder that does not exist yet, or is empty.
    superlink_hosts : list[str]
        The names and addresses SuperNodes, SuperExecs and ``flwr`` use to reach the SuperLink.
    supernodes : dict[str, list[str]]
        Per SuperNode (a short name, e.g. the compose letter), the names and addresses its
        SuperExec uses to reach it.
    days : int
        How long the certificates are valid.

    Returns
    -------
    Issued
        The folder and each SuperNode's public key.
    """
    if out.exists() and any(out.iterdir()):
        raise FedmergeError(
            f"{out} is not empty; credentials are never overwritten: give a new folder with --out"
        )
    if not superlink_hosts:
        raise FedmergeError("no SuperLink host given; name at least one with --host")
    if not supernodes:
        raise FedmergeError("no SuperNode given; name them with --supernodes, e.g. a,b")
    bad = [n for n in supernodes if not n.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise FedmergeError(f"SuperNode name {bad[0]!r}: use letters, digits, - and _ only")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        public_keys = _issue_into(partial, superlink_hosts, supernodes, days)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays
    return Issued(out, {name: out / path for name, path in public_keys.items()})


def _issue_into(
    out: Path, superlink_hosts: list[str], supernodes: dict[str, list[str]], days: int
) -> dict[str, Path]:
    """Write every credential into the new folder `out`; each SuperNode's public key (relative)."""
    ca_key = ec.generate_private_key(CURVE)
    ca_cert = _certificate("fedmerge deployment CA", ca_key, None, [], days)
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _server(out / "superlink", "superlink", superlink_hosts, (ca_cert, ca_key), days)
    public_keys = {}
    for name, hosts in supernodes.items():
        folder = out / f"supernode-{name}"
        _server(folder, f"supernode-{name}", hosts, (ca_cert, ca_key), days)
        auth = ec.generate_private_key(CURVE)
        _write(
            folder / "auth.key",
            auth.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            private=True,
        )
        public = auth.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(folder / "auth.pub", public + b"\n")
        public_keys[name] = Path(folder.name) / "auth.pub"
    return public_keys
