"""Check a connection to a SuperLink and name the actual problem, before Flower hides it.

    python -m deploy.preflight lowprec                      # a connection of $FLWR_HOME/config.toml
    python -m deploy.preflight --superlink HOST:PORT --root-certificates ca.crt
    python -m deploy.preflight --superlink HOST:PORT --insecure
    ... --auth-supernode-private-key supernode-0.key        # also check a SuperNode's key

From the ``flwr`` CLI, a dead port, a missing CA file, ``insecure = true`` against a TLS
SuperLink and the wrong CA all end in the same "Connection to the SuperLink is unavailable".
This command checks, in order: the connection's settings, the CA file, a SuperNode key if
given, the TCP port, whether the SuperLink speaks TLS or plain text, the certificate's
validity dates, the certificate chain against the CA, and the host name against the
certificate. It
prints one line per check and exits 1 at the first problem, with its fix.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

#: Days before a certificate's end from which preflight warns.
EXPIRY_WARNING_DAYS = 30
TIMEOUT_S = 5.0
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH_CODES = (62, 64)


class PreflightError(Exception):
    """A check failed; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Target:
    """Where to connect and how: what the CLI or a SuperNode would use."""

    host: str
    port: int
    root_certificates: Path | None
    insecure: bool
    source: str  # where the settings came from, for messages


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise PreflightError(f"address {address!r} is not HOST:PORT, e.g. 192.0.2.10:8000")
    return host.strip("[]"), int(port)


def target_from_connection(name: str | None) -> Target:
    """The settings of connection ``name`` (None: the default) as the ``flwr`` CLI reads them."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.supercore.utils import get_flwr_home

    try:
        connection = read_superlink_connection(name)
    except click.ClickException as err:
        raise PreflightError(err.format_message()) from None
    source = f"connection {connection.name!r} in {get_flwr_home() / 'config.toml'}"
    if not connection.address:
        raise PreflightError(f'{source} has no address: add address = "HOST:PORT"')
    if connection.root_certificates and connection.insecure:
        raise PreflightError(
            f"{source} sets both root-certificates and insecure = true: keep root-certificates "
            "for a TLS SuperLink, or only insecure = true for a plain-text one"
        )
    host, port = parse_address(connection.address)
    ca = Path(connection.root_certificates).expanduser() if connection.root_certificates else None
    return Target(host, port, ca, bool(connection.insecure), source)


def check_ca_file(target: Target) -> x509.Certificate | None:
    """The CA certificate the target trusts (None for plain text or the system store)."""
    if target.insecure or target.root_certificates is None:
        return None
    path = target.root_certificates
    if not path.is_file():
        raise PreflightError(
            f"the CA file {path} ({target.source}) does not exist: copy ca.crt from the "
            "credentials folder (deploy.make_credentials) and point root-certificates at it"
        )
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise PreflightError(
            f"{path} is not a PEM certificate: root-certificates must be ca.crt, not a key "
            "or server.pem's key"
        ) from None
    _check_dates(cert, f"the CA certificate {path}")
    return cert


def check_port(target: Target) -> None:
    """Something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((target.host, target.port), timeout=TIMEOUT_S):
            pass
    except socket.gaierror as err:
        raise PreflightError(f"cannot resolve {target.host!r}: {err.strerror}") from None
    except ConnectionRefusedError:
        raise PreflightError(
            f"nothing listens on {target.host}:{target.port}: is the SuperLink running, and "
            "is this its port (flower-superlink --port, 8000 by default)?"
        ) from None
    except OSError as err:
        raise PreflightError(
            f"cannot reach {target.host}:{target.port} ({err}): a firewall, or the wrong host"
        ) from None


def probe_tls(target: Target) -> x509.Certificate | None:
    """The SuperLink's certificate if it speaks TLS, None if it speaks plain text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=target.host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, ConnectionResetError, TimeoutError, OSError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def check_tls_mode(target: Target, server_cert: x509.Certificate | None) -> None:
    """The client's TLS setting matches what the SuperLink speaks."""
    if server_cert is not None and target.insecure:
        raise PreflightError(
            f"the SuperLink at {target.host}:{target.port} uses TLS, but {target.source} says "
            "insecure = true: remove insecure and set root-certificates to the CA that signed "
            "its certificate (SuperNodes: drop --insecure, add --root-certificates ca.crt)"
        )
    if server_cert is None and not target.insecure:
        raise PreflightError(
            f"the SuperLink at {target.host}:{target.port} speaks plain text (it was started "
            "with --insecure): restart it with --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile, "
            f"or set insecure = true in {target.source} (unencrypted: development only)"
        )


def check_chain(target: Target, server_cert: x509.Certificate) -> None:
    """The server's certificate verifies against the CA, for the host name dialled."""
    context = ssl.create_default_context(
        cafile=str(target.root_certificates) if target.root_certificates else None
    )
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=target.host),
        ):
            pass
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in NAME_MISMATCH_CODES:
            raise PreflightError(
                f"the SuperLink's certificate is for {_names(server_cert)}, not {target.host!r}: "
                f"connect by one of those names, or renew it for this one with python -m "
                f"deploy.make_credentials CREDS --renew-server --host {target.host}"
            ) from None
        trusted = target.root_certificates or "the system's trust store"
        raise PreflightError(
            f"the SuperLink's certificate (issued by {server_cert.issuer.rfc4514_string()}) is "
            f"not signed by the CA in {trusted} ({err.verify_message}): use the ca.crt from the "
            "same credentials folder as the SuperLink's server.pem"
        ) from None


def check_supernode_key(path: Path) -> None:
    """A SuperNode auth key that ``flower-supernode --auth-supernode-private-key`` loads."""
    if not path.is_file():
        raise PreflightError(f"the SuperNode key {path} does not exist")
    try:
        load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise PreflightError(
            f"{path} is not an OpenSSH private key ({err}): pass supernode-<i>.key, not .pub"
        ) from None


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def _check_dates(cert: x509.Certificate, what: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        raise PreflightError(f"{what} is valid only from {cert.not_valid_before_utc:%Y-%m-%d}")
    if now > cert.not_valid_after_utc:
        raise PreflightError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}: renew it (python -m "
            "deploy.make_credentials CREDS --renew-server for the SuperLink's)"
        )
    left = (cert.not_valid_after_utc - now).days
    if left < EXPIRY_WARNING_DAYS:
        print(f"warning: {what} expires in {left} days ({cert.not_valid_after_utc:%Y-%m-%d})")


def preflight(target: Target, supernode_key: Path | None = None) -> list[str]:
    """Run every check; returns what passed, raises ``PreflightError`` at the first failure."""
    passed = [f"settings from {target.source}"]
    ca = check_ca_file(target)
    if ca is not None:
        passed.append(f"CA file {target.root_certificates} ({ca.subject.rfc4514_string()})")
    if supernode_key is not None:
        check_supernode_key(supernode_key)
        passed.append(f"SuperNode key {supernode_key}")
    check_port(target)
    passed.append(f"{target.host}:{target.port} accepts connections")
    server_cert = probe_tls(target)
    check_tls_mode(target, server_cert)
    if server_cert is None:
        passed.append("the SuperLink speaks plain text, as insecure = true expects")
        return passed
    _check_dates(server_cert, "the SuperLink's certificate")  # before the handshake refuses it
    check_chain(target, server_cert)
    until = f"{server_cert.not_valid_after_utc:%Y-%m-%d}"
    passed.append(f"TLS: certificate for {_names(server_cert)} verifies, valid until {until}")
    return passed


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deploy.preflight``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.preflight", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "connection", nargs="?", help="a [superlink.NAME] of $FLWR_HOME/config.toml"
    )
    parser.add_argument("--superlink", help="HOST:PORT, instead of a named connection")
    parser.add_argument("--root-certificates", type=Path, help="the CA certificate (ca.crt)")
    parser.add_argument("--insecure", action="store_true", help="expect a plain-text SuperLink")
    parser.add_argument(
        "--auth-supernode-private-key", type=Path, help="also check this SuperNode key"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0: every check passed)."""
    args = build_parser().parse_args(argv)
    try:
        if args.superlink:
            host, port = parse_address(args.superlink)
            if args.insecure and args.root_certificates:
                raise PreflightError("give --root-certificates or --insecure, not both")
            target = Target(host, port, args.root_certificates, args.insecure, "the command line")
        else:
            target = target_from_connection(args.connection)
        for line in preflight(target, args.auth_supernode_private_key):
            print(f"ok: {line}")
    except PreflightError as problem:
        print(f"PROBLEM: {problem}")
        return 1
    print("ok: ready to connect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
