"""deploy.make_credentials: a CA, a SuperLink certificate and SuperNode keys Flower accepts."""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from deploy.make_credentials import main, make_credentials

HOSTS = ["superlink.example.org", "192.0.2.10"]


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("credentials")
    make_credentials(out, 2, hosts=HOSTS)
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_permissions(creds: Path) -> None:
    names = {p.name for p in creds.iterdir()}
    assert names == {
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
        "supernode-0.key",
        "supernode-0.pub",
        "supernode-1.key",
        "supernode-1.pub",
    }
    for name in names:
        mode = stat.S_IMODE((creds / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name


def test_server_certificate_is_signed_by_the_ca_for_every_host(creds: Path) -> None:
    ca, server = _cert(creds / "ca.crt"), _cert(creds / "server.pem")
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert dns == {"superlink.example.org", "localhost"}
    assert ips == {"192.0.2.10", "127.0.0.1", "::1"}
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def _handshake(creds: Path, server_name: str) -> bytes:
    """Serve TLS with the SuperLink certificate on loopback; connect trusting only the CA."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(creds / "server.pem", creds / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(creds / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with (
                conn,
                contextlib.suppress(ssl.SSLError, OSError),
                server_ctx.wrap_socket(conn, server_side=True) as tls,
            ):
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                return tls.recv(2)
        finally:
            thread.join(10)


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1", *HOSTS])
def test_tls_handshake_verifies_against_the_ca(creds: Path, server_name: str) -> None:
    assert _handshake(creds, server_name) == b"ok"


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(creds: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(creds, "other.example.org")


def test_supernode_keys_load_with_flowers_own_loaders(creds: Path) -> None:
    for i in range(2):
        args = argparse.Namespace(
            auth_supernode_private_key=str(creds / f"supernode-{i}.key"),
            auth_supernode_public_key=None,
        )
        private, public = _try_setup_client_authentication(args)  # flower-supernode
        assert isinstance(private.curve, ec.SECP384R1)
        registered = try_load_public_key(creds / f"supernode-{i}.pub")  # flwr supernode register
        assert registered == public_key_to_bytes(public)  # the pair matches
    assert (creds / "supernode-0.pub").read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    assert (creds / "supernode-0.key").read_bytes() != (creds / "supernode-1.key").read_bytes()


def test_refuses_to_overwrite_without_force(creds: Path, capsys) -> None:
    before = (creds / "ca.key").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([str(creds), "--supernodes", "2"])
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
    assert (creds / "ca.key").read_bytes() == before


def test_cli_writes_the_requested_number_of_keys(tmp_path: Path, capsys) -> None:
    main([str(tmp_path), "--supernodes", "3", "--host", "10.0.0.1"])
    assert sorted(p.name for p in tmp_path.glob("supernode-*.pub")) == [
        "supernode-0.pub",
        "supernode-1.pub",
        "supernode-2.pub",
    ]
    assert "keep it secret" in capsys.readouterr().out
    main([str(tmp_path), "--supernodes", "1", "--force"])


def test_keys_only_adds_supernode_keys_and_keeps_the_ca(tmp_path: Path) -> None:
    creds = tmp_path
    make_credentials(creds, 2)
    ca_before = (creds / "ca.crt").read_bytes()
    paths = make_credentials(creds, 1, keys_only=True, first_index=2)
    assert sorted(paths) == ["supernode-2.key", "supernode-2.pub"]
    assert (creds / "ca.crt").read_bytes() == ca_before
    assert try_load_public_key(creds / "supernode-2.pub")
    with pytest.raises(FileExistsError):
        make_credentials(creds, 1, keys_only=True, first_index=2)
