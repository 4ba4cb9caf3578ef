"""A throw-away certificate authority for the simulated cloud.

Rules of this module: keys and certificates live in memory or in a temp directory the caller
owns; nothing here is ever trusted outside a test world. Keys are EC P-256 (fast to make: a whole
vendor set takes milliseconds) and certificates carry the host name as a DNS SAN, so clients
verify with SNI and hostname checking exactly as a speaker does against the real cloud.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Validity is short on purpose: these certificates exist for one test run. The start is backdated
# a little so that clock skew between namespaces (there is none, but CI VMs drift) never matters.
_VALID_FOR = _dt.timedelta(days=2)
_BACKDATE = _dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A server certificate and its key, PEM-encoded."""

    host: str
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where `TestCA.write` put things: the CA bundle and one (cert, key) pair per host."""

    ca_path: Path
    servers: dict[str, tuple[Path, Path]]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A self-signed root that issues one leaf certificate per host name."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, common_name: str = "hushgate test CA") -> None:
        now = _dt.datetime.now(_dt.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALID_FOR)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self._key)

    def issue(self, host: str) -> IssuedCert:
        """A leaf certificate for `host` (DNS SAN), signed by this CA."""
        now = _dt.datetime.now(_dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCert(host, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

    def write(self, directory: Path, hosts: list[str] | tuple[str, ...]) -> CertFiles:
        """Write `ca.pem` and `<host>.pem`/`<host>.key` for every host into `directory`.

        Python's ssl module loads certificates from files only, hence the directory; the caller
        owns it (a temp dir removed with the topology)."""
        directory.mkdir(parents=True, exist_ok=True)
        ca_path = directory / "ca.pem"
        ca_path.write_bytes(self.cert_pem)
        servers: dict[str, tuple[Path, Path]] = {}
        for host in hosts:
            issued = self.issue(host)
            cert_path = directory / f"{host}.pem"
            key_path = directory / f"{host}.key"
            cert_path.write_bytes(issued.cert_pem)
            key_path.touch(mode=0o600)
            key_path.write_bytes(issued.key_pem)
            servers[host] = (cert_path, key_path)
        return CertFiles(ca_path, servers)
