"""Generate everything a secure Flower deployment needs, with the ``cryptography`` library.

    python -m deploy.make_credentials OUT_DIR --supernodes N [--host HOST ...]
    python -m deploy.make_credentials OUT_DIR --renew-server [--host HOST ...]
    python -m deploy.make_credentials OUT_DIR --keys-only --supernodes 1 --first-index K

Writes into ``OUT_DIR``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384). ``ca.crt`` goes to
  every SuperNode (``--root-certificates``) and to the ``flwr`` CLI (``root-certificates``);
  ``ca.key`` stays with whoever issues certificates.
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  every ``--host`` plus ``localhost``, ``127.0.0.1`` and ``::1`` (the SuperLink's own SuperExec
  connects to it over loopback).
* ``supernode-<i>.key`` / ``supernode-<i>.pub`` for i = 0..N-1: SuperNode authentication key
  pairs, ECDSA P-384 in OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
  and ``flwr supernode register`` read). Only the ``.pub`` files go to the SuperLink operator.

Validity: the CA for ``CA_DAYS`` (10 years), the SuperLink certificate for ``--days``
(``SERVER_DAYS``, 825 days, the longest browsers accept; Flower does not check a maximum).
SuperNode keys do not expire: a node is revoked by unregistering it on the SuperLink
(``flwr supernode unregister``).

Private keys are written with mode 0600. Existing files are kept unless ``--force`` is given
(which replaces the CA and every key: every SuperNode must then be registered again).
``--renew-server`` re-issues only ``server.pem`` / ``server.key`` from the existing CA, for a
certificate about to expire (it keeps the old certificate's names unless ``--host`` is given)
or new ``--host`` names: SuperNodes and the CLI keep working.
``--keys-only --first-index K`` adds SuperNode key pairs K, K+1, ... to an existing folder
(a node whose key was unregistered needs a new one: Flower never accepts that key again).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names every server certificate covers, so loopback connections always verify.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1
CA_DAYS = 3650
SERVER_DAYS = 825


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lowprec-fl"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(days: int = CA_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    name = _name("lowprec-fl CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    days: int = SERVER_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate signed by the CA, with SANs for ``hosts`` and loopback."""
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def supernode_key_pair() -> tuple[bytes, bytes]:
    """(private, public) SuperNode auth key: ECDSA P-384 in OpenSSH format."""
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass --force to overwrite")
    mode = 0o600 if private else 0o644
    # Created with its final mode, so a private key is never readable by others, not even
    # between writing and chmod (O_CREAT applies the mode only to a new file: chmod as well).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def make_credentials(
    out_dir: Path,
    num_supernodes: int,
    hosts: Sequence[str] = ("127.0.0.1",),
    force: bool = False,
    keys_only: bool = False,
    first_index: int = 0,
) -> dict[str, Path]:
    """Write the CA, the SuperLink certificate and ``num_supernodes`` key pairs; returns paths.

    ``keys_only`` writes just the SuperNode key pairs, numbered from ``first_index`` (e.g. a
    new key for a node whose old key was unregistered: Flower never accepts that key again).
    """
    if num_supernodes < 0:
        raise ValueError(f"--supernodes must be >= 0, got {num_supernodes}")
    if first_index < 0:
        raise ValueError(f"--first-index must be >= 0, got {first_index}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[bytes, bool]] = {}
    if not keys_only:
        ca_cert, ca_key = make_ca()
        server_cert, server_key = make_server_certificate(ca_cert, ca_key, hosts)
        files["ca.crt"] = (ca_cert.public_bytes(serialization.Encoding.PEM), False)
        files["ca.key"] = (_pem_key(ca_key), True)
        files["server.pem"] = (server_cert.public_bytes(serialization.Encoding.PEM), False)
        files["server.key"] = (_pem_key(server_key), True)
    for i in range(first_index, first_index + num_supernodes):
        private, public = supernode_key_pair()
        files[f"supernode-{i}.key"] = (private, True)
        files[f"supernode-{i}.pub"] = (public, False)
    if not force:
        clashes = [name for name in files if (out_dir / name).exists()]
        if clashes:
            raise FileExistsError(f"{out_dir} already holds {clashes}: pass --force to overwrite")
    paths = {}
    for name, (data, private) in files.items():
        _write(out_dir / name, data, private, force=True)
        paths[name] = out_dir / name
    return paths


def renew_server_certificate(
    out_dir: Path, hosts: Sequence[str] | None = None, days: int = SERVER_DAYS
) -> dict[str, Path]:
    """Re-issue ``server.pem`` / ``server.key`` from the CA in ``out_dir``; nothing else changes.

    ``hosts`` None keeps the names of the certificate it replaces. Restart the SuperLink with
    the new files; SuperNodes and the CLI trust the same CA.
    """
    ca_cert_path, ca_key_path = out_dir / "ca.crt", out_dir / "ca.key"
    missing = [str(p) for p in (ca_cert_path, ca_key_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot renew the server certificate without the CA: {missing} missing (a new CA "
            "means new credentials for every node: make them without --renew-server, --force)"
        )
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
        ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers()
    ):
        raise ValueError(f"{ca_key_path} is not the key of {ca_cert_path}")
    if hosts is None:
        hosts = _certified_names(out_dir / "server.pem") or ["127.0.0.1"]
    cert, key = make_server_certificate(ca_cert, ca_key, hosts, days)
    paths = {"server.pem": out_dir / "server.pem", "server.key": out_dir / "server.key"}
    _write(paths["server.pem"], cert.public_bytes(serialization.Encoding.PEM), False, force=True)
    _write(paths["server.key"], _pem_key(key), True, force=True)
    return paths


def _certified_names(path: Path) -> list[str]:
    """The names (DNS names, IP addresses) a certificate covers besides loopback; [] if none."""
    if not path.is_file():
        return []
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [n for n in names if n not in LOOPBACK_NAMES]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.renew_server:
            paths = renew_server_certificate(args.out_dir, args.host, args.days)
        else:
            paths = make_credentials(
                args.out_dir,
                args.supernodes,
                args.host or ["127.0.0.1"],
                args.force,
                keys_only=args.keys_only,
                first_index=args.first_index,
            )
    except (OSError, ValueError) as err:  # FileExistsError, PermissionError, ...
        parser.exit(2, f"error: {err}\n")
    for name, path in paths.items():
        print(f"wrote {path}" + ("  (private: keep it secret)" if name.endswith(".key") else ""))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deploy.make_credentials``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.make_credentials", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the files into")
    parser.add_argument(
        "--supernodes", type=int, default=0, help="number of SuperNode key pairs (default 0)"
    )
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="a DNS name or IP address the SuperLink is reached at (repeatable; "
        "default 127.0.0.1, or with --renew-server the names of the certificate it replaces; "
        "localhost, 127.0.0.1 and ::1 are always included)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument(
        "--keys-only",
        action="store_true",
        help="write only SuperNode key pairs (no CA, no server certificate)",
    )
    parser.add_argument(
        "--first-index", type=int, default=0, help="number of the first SuperNode key pair"
    )
    parser.add_argument(
        "--renew-server",
        action="store_true",
        help="re-issue only the SuperLink certificate, from the CA already in OUT_DIR",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=SERVER_DAYS,
        help=f"validity of the SuperLink certificate (default {SERVER_DAYS})",
    )
    return parser


if __name__ == "__main__":
    main()
