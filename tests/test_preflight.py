"""deploy.preflight names the real problem behind "Connection to the SuperLink is unavailable".

Against TLS and plain-text servers on loopback made with the project's own credentials (the
real SuperLink cases run in tests/test_deployment.py).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy.make_credentials import make_credentials
from deploy.preflight import main


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("credentials")
    make_credentials(out, 1, hosts=["127.0.0.1"])
    other = out / "other"
    make_credentials(other, 0)
    return out


@contextlib.contextmanager
def _server(creds: Path | None, bind: str = "127.0.0.1") -> Iterator[int]:
    """A loopback server: TLS with ``creds``' SuperLink certificate, or plain text (None)."""
    context = None
    if creds is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(creds / "server.pem", creds / "server.key")
    listener = socket.create_server((bind, 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                if context is None:
                    conn.settimeout(1)
                    conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an HTTP/2 frame
                    conn.recv(1024)
                else:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_a_good_tls_connection_passes_every_check(creds, capsys):
    with _server(creds) as port:
        code, out = _run(
            capsys,
            "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(creds / "ca.crt"),
            "--auth-supernode-private-key", str(creds / "supernode-0.key"),
        )  # fmt: skip
    assert code == 0, out
    assert "verifies, valid until" in out and "ready to connect" in out


@pytest.mark.parametrize(
    ("server", "args", "problem"),
    [
        ("tls", ["--root-certificates", "{creds}/missing.crt"], "does not exist"),
        ("tls", ["--root-certificates", "{creds}/server.key"], "is not a PEM certificate"),
        ("tls", ["--root-certificates", "{creds}/other/ca.crt"], "not signed by the CA"),
        ("tls", ["--insecure"], "uses TLS, but the command line says insecure = true"),
        ("plain", ["--root-certificates", "{creds}/ca.crt"], "speaks plain text"),
        ("none", ["--root-certificates", "{creds}/ca.crt"], "nothing listens on"),
        ("tls", ["--insecure", "--auth-supernode-private-key", "{creds}/supernode-0.pub"],
         "is not an OpenSSH private key"),
    ],
)  # fmt: skip
def test_each_misconfiguration_gets_its_own_diagnosis(creds, capsys, server, args, problem):
    args = [a.format(creds=creds) for a in args]
    with contextlib.ExitStack() as stack:
        if server == "none":
            with socket.create_server(("127.0.0.1", 0)) as s:
                port = s.getsockname()[1]  # closed again: nothing listens
        else:
            port = stack.enter_context(_server(creds if server == "tls" else None))
        code, out = _run(capsys, "--superlink", f"127.0.0.1:{port}", *args)
    assert code == 1, out
    assert "PROBLEM: " in out and problem in out, out


def test_a_plain_text_server_passes_with_insecure(capsys, creds):
    with _server(None) as port:
        code, out = _run(capsys, "--superlink", f"127.0.0.1:{port}", "--insecure")
    assert code == 0, out
    assert "plain text, as insecure = true expects" in out


def test_a_host_name_outside_the_certificate_is_named(creds, capsys):
    # The server listens on every loopback address; 127.0.0.2 is not among the names
    # make_credentials certifies (the --host names plus localhost, 127.0.0.1 and ::1).
    with _server(creds, bind="0.0.0.0") as port:
        code, out = _run(
            capsys,
            "--superlink", f"127.0.0.2:{port}",
            "--root-certificates", str(creds / "ca.crt"),
        )  # fmt: skip
    assert code == 1, out
    assert "not '127.0.0.2'" in out and "--renew-server --host 127.0.0.2" in out, out


def test_a_named_connection_is_read_like_the_flwr_cli(tmp_path, capsys, monkeypatch, creds):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    with _server(creds) as port:
        (tmp_path / "config.toml").write_text(
            f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{creds / "ca.crt"}"\ninsecure = true\n'
        )
        code, out = _run(capsys, "lab")
        assert code == 1 and "sets both root-certificates and insecure = true" in out, out
        (tmp_path / "config.toml").write_text(
            f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{creds / "ca.crt"}"\n'
        )
        code, out = _run(capsys)  # the default connection
    assert code == 0, out
    assert f"connection 'lab' in {tmp_path / 'config.toml'}" in out
    code, out = _run(capsys, "missing")
    assert code == 1 and "'missing' not found" in out, out


def test_an_expired_server_certificate_is_named_not_blamed_on_the_ca(creds, tmp_path, capsys):
    ca_cert = x509.load_pem_x509_certificate((creds / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((creds / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with _server(tmp_path) as port:
        code, out = _run(
            capsys, "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(creds / "ca.crt")
        )
    assert code == 1, out
    assert "the SuperLink's certificate expired on" in out and "--renew-server" in out, out
