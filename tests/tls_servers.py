"""Servers that speak TLS only, for tests: a throwaway CA, and a private Redis with a TLS port.

:class:`ThrowawayCA` makes a certificate authority (an EC P-256 key, never stored outside the test's
folder) and issues server certificates for the names a test chooses: ``127.0.0.1`` and
``localhost`` for the real thing, another name for a certificate a client must refuse.
:class:`PrivateTlsRedis` runs a ``redis-server`` of its own with no plain port at all, only a TLS
port on 127.0.0.1; the RabbitMQ counterpart is :class:`tests.private_broker.PrivateBroker` with
``tls=``. Both end exactly the process they started, by its pid, within a bounded time.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.tls import speaks_tls
from tests.private_redis import RedisProcess

# Long enough for any test run, short enough that a leaked file is worthless soon.
VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files a TLS server is started with: the CA that signed it, its certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class ThrowawayCA:
    """A certificate authority that lives in ``folder`` for one test session.

    ``ca_cert`` is the bundle a client is given with ``--tls-ca``; :meth:`issue` signs a server
    certificate. The extensions are the ones strict verifiers (Python 3.13's X509_STRICT) expect.
    """

    def __init__(self, folder: Path, common_name: str = "asyncloco throwaway test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        public = self._key.public_key()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_cert = folder / "ca.pem"
        self.ca_cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, hosts: Sequence[str]) -> TlsFiles:
        """A server certificate and key for ``hosts`` (IP addresses and DNS names), signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        files = TlsFiles(ca_cert=self.ca_cert, cert=self.folder / f"{name}.pem",
                         key=self.folder / f"{name}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(files.key, key)
        return files


class PrivateTlsRedis(RedisProcess):
    """A ``redis-server`` on 127.0.0.1 with a TLS port and no plain port, all of it under ``root``.

    Nothing is persisted (no RDB, no AOF). :meth:`start` waits until a client that trusts the CA
    gets a PING through; :meth:`stop` ends exactly the process :meth:`start` launched.
    """

    def __init__(self, root: Path, tls: TlsFiles) -> None:
        super().__init__(root, scheme="rediss")
        self.tls = tls

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until its port completes TLS handshakes.

        Only the protocol is awaited, not a verified PING: a test may start a server with a
        certificate that its clients must refuse.
        """
        proc = self.launch(["--port", "0", "--tls-port", str(self.port),
                            "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                            "--tls-ca-cert-file", str(self.tls.ca_cert), "--tls-auth-clients", "no"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{self.logs()}")
            if speaks_tls("127.0.0.1", self.port, timeout_s=1.0):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on TLS port {self.port} within {timeout_s:.0f}s:\n"
                           f"{self.logs()}")
