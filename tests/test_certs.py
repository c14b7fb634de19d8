"""``fedmerge deploy certs``: a CA, TLS certificates and SuperNode keys that Flower accepts."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.hazmat.primitives.serialization.ssh import load_ssh_public_key
from typer.testing import CliRunner

from fedmerge import certs
from fedmerge.certs import issue
from fedmerge.cli import app
from fedmerge.errors import FedmergeError


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(cert: x509.Certificate) -> set[str]:
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in alt}


def test_issue_writes_a_chain_flower_accepts(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    issued = issue(out, ["superlink", "10.0.0.1"], {"a": ["supernode-a", "localhost"]})
    ca = certificate(out / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for folder, hosts in (
        ("superlink", {"superlink", "10.0.0.1"}),
        ("supernode-a", {"supernode-a", "localhost"}),
    ):
        cert = certificate(out / folder / "server.crt")
        cert.verify_directly_issued_by(ca)  # raises when the CA did not sign it
        assert names(cert) == hosts
        key = load_pem_private_key((out / folder / "server.key").read_bytes(), None)
        assert key.public_key() == cert.public_key()
        assert len((out / folder / "superexec.secret").read_bytes()) == 64
    alt = certificate(out / "superlink" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert ipaddress.ip_address("10.0.0.1") in alt.value.get_values_for_type(x509.IPAddress)
    # the SuperNode's key is what flower-supernode and `flwr supernode register` read
    private = load_ssh_private_key((out / "supernode-a" / "auth.key").read_bytes(), None)
    public = load_ssh_public_key(issued.public_keys["a"].read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key() == public
    assert public.curve.name == "secp384r1"
    secret = [p for p in out.rglob("*") if p.suffix in {".key", ".secret"}]
    assert len(secret) == 6
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secret)
    assert stat.S_IMODE((out / "ca.crt").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs"]  # no partial folder left


def test_issue_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text("mine")
    with pytest.raises(FedmergeError, match="not empty; credentials are never overwritten"):
        issue(tmp_path / "certs", ["superlink"], {"a": ["supernode-a"]})
    assert (tmp_path / "certs" / "ca.crt").read_text() == "mine"


def test_a_failed_issue_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FedmergeError, match="SuperNode name 'a/b'"):
        issue(tmp_path / "certs", ["superlink"], {"a/b": ["x"]})
    real = certs._server

    def full_disk(folder: Path, *args: object) -> None:
        if folder.name == "supernode-b":
            raise OSError(28, "No space left on device")
        real(folder, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(certs, "_server", full_disk)
    with pytest.raises(OSError, match="No space left"):
        issue(tmp_path / "certs", ["superlink"], {"a": ["x"], "b": ["y"]})
    assert not list(tmp_path.iterdir())  # nor the half-written folder


def test_cli_prints_the_registration_commands(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", "certs", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert f"flwr supernode register {tmp_path / 'c' / 'supernode-b' / 'auth.pub'}" in result.output
    assert names(certificate(tmp_path / "c" / "superlink" / "server.crt")) == {
        "superlink",
        "localhost",
        "127.0.0.1",
    }
    twice = CliRunner().invoke(
        app, ["deploy", "certs", "--out", str(tmp_path / "d"), "--supernodes", "a,a"]
    )
    assert twice.exit_code != 0
    assert "names a SuperNode twice" in str(twice.exception) + twice.output
