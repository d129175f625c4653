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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
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


def _fingerprints(creds: Path, supernodes: int) -> dict[str, bytes]:
    """SHA-256 fingerprints of the CA and server certificates and of each SuperNode key."""
    prints = {
        name: _cert(creds / name).fingerprint(hashes.SHA256()) for name in ("ca.crt", "server.pem")
    }
    for i in range(supernodes):
        prints[f"supernode-{i}.pub"] = try_load_public_key(creds / f"supernode-{i}.pub")
    return prints


def test_force_regenerates_the_files_and_without_it_they_are_kept(tmp_path: Path, capsys) -> None:
    main([str(tmp_path), "--supernodes", "2", "--host", "10.0.0.1"])
    old_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    old_prints = _fingerprints(tmp_path, 2)
    capsys.readouterr()

    # Without --force: refused, nothing rewritten.
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--supernodes", "2"])
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old_bytes

    main([str(tmp_path), "--supernodes", "1", "--force"])
    new_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new_prints = _fingerprints(tmp_path, 1)
    regenerated = ["ca.crt", "ca.key", "server.pem", "server.key"]
    regenerated += ["supernode-0.key", "supernode-0.pub"]
    for name in regenerated:  # every file this run writes is new
        assert new_bytes[name] != old_bytes[name], name
    for name, fingerprint in new_prints.items():
        assert fingerprint != old_prints[name], name
    # Key pair 1 was not asked for: it is left as it was.
    for name in ("supernode-1.key", "supernode-1.pub"):
        assert new_bytes[name] == old_bytes[name], name
    # The new files belong together (and not with the old CA), with private modes kept.
    ca, server = _cert(tmp_path / "ca.crt"), _cert(tmp_path / "server.pem")
    server.verify_directly_issued_by(ca)
    old_ca = x509.load_pem_x509_certificate(old_bytes["ca.crt"])
    with pytest.raises((ValueError, InvalidSignature)):
        server.verify_directly_issued_by(old_ca)
    server_key = serialization.load_pem_private_key(new_bytes["server.key"], password=None)
    assert public_key_to_bytes(server_key.public_key()) == public_key_to_bytes(server.public_key())
    for name in regenerated:
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    args = argparse.Namespace(
        auth_supernode_private_key=str(tmp_path / "supernode-0.key"),
        auth_supernode_public_key=None,
    )
    _, public = _try_setup_client_authentication(args)
    assert public_key_to_bytes(public) == new_prints["supernode-0.pub"]


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


def test_private_keys_are_never_readable_by_others_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mode is set when the file is created, not by a chmod after its bytes are written."""
    import deploy.make_credentials as module

    modes: dict[str, int] = {}
    real_fdopen = module.os.fdopen

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        path = Path(f"/proc/self/fd/{fd}").resolve()
        modes[path.name] = stat.S_IMODE(module.os.fstat(fd).st_mode)
        return handle

    monkeypatch.setattr(module.os, "fdopen", fdopen)
    make_credentials(tmp_path, 1)
    keys = {name: mode for name, mode in modes.items() if name.endswith(".key")}
    assert set(keys) >= {"ca.key", "server.key", "supernode-0.key"}, modes
    assert all(mode == 0o600 for mode in keys.values()), keys


def test_renew_server_reissues_only_the_server_certificate(tmp_path: Path, capsys) -> None:
    main([str(tmp_path), "--supernodes", "2", "--host", "10.0.0.1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    old_server = _cert(tmp_path / "server.pem")
    main([str(tmp_path), "--renew-server", "--host", "link.example.org", "--days", "30"])
    assert "server.pem" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"server.pem", "server.key"}  # CA and SuperNode keys untouched
    server = _cert(tmp_path / "server.pem")
    server.verify_directly_issued_by(_cert(tmp_path / "ca.crt"))  # trusted as before
    assert server.serial_number != old_server.serial_number
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert round(lifetime.total_seconds() / 86400) == 30
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    assert _handshake(tmp_path, "link.example.org") == b"ok"


def test_renew_server_without_hosts_keeps_the_certified_names(tmp_path: Path) -> None:
    make_credentials(tmp_path, 0, hosts=HOSTS)
    main([str(tmp_path), "--renew-server"])
    san = (
        _cert(tmp_path / "server.pem")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "192.0.2.10", "127.0.0.1", "::1"
    }  # fmt: skip


def test_renew_server_needs_the_ca_that_issued_the_credentials(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--renew-server"])
    assert "ca.crt" in capsys.readouterr().err
    make_credentials(tmp_path / "a", 0)
    make_credentials(tmp_path / "b", 0)
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), "--renew-server"])
    assert "is not the key of" in capsys.readouterr().err


def test_validity_periods_are_the_documented_ones(creds: Path) -> None:
    for name, days in (("ca.crt", 3650), ("server.pem", 825)):
        cert = _cert(creds / name)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert round(lifetime.total_seconds() / 86400) == days, name
