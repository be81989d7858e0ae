"""TLS towards Redis and RabbitMQ: how a server's certificate is checked, and what a refusal means.

A ``rediss://`` or ``amqps://`` URL turns TLS on. The server's certificate must then chain to the
system's default CAs or to the PEM bundle given with ``--tls-ca``
(:attr:`shared.settings.ConnectionSettings.tls_ca_file`), and name the URL's host (a DNS name or
an IP address in its subjectAltName). Requiring TLS is simply using those URLs: nothing falls back
to plain text.

A certificate that does not pass, or a URL whose scheme does not match what the port speaks, is a
configuration problem, not an outage: retrying would only hang. :func:`tls_refusal` tells the two
apart; the Redis connections of :func:`shared.settings.connect_redis` and the AMQP connections of
:func:`shared.settings.open_amqp` raise its :class:`ConfigError` (one line, exit 1 in the CLIs)
instead of an error that every caller would retry.
"""

from __future__ import annotations

import os
import socket
import ssl
from urllib.parse import urlparse

import pika.exceptions
import redis
import redis.connection

from shared.errors import ConfigError

# scheme -> (the service's name in messages, its TLS scheme, its plain scheme, default port)
_SCHEMES: dict[str, tuple[str, str, str, int]] = {
    "redis": ("Redis", "rediss", "redis", 6379),
    "rediss": ("Redis", "rediss", "redis", 6379),
    "redis+cluster": ("Redis", "rediss+cluster", "redis+cluster", 6379),
    "rediss+cluster": ("Redis", "rediss+cluster", "redis+cluster", 6379),
    "amqp": ("RabbitMQ", "amqps", "amqp", 5672),
    "amqps": ("RabbitMQ", "amqps", "amqp", 5671),
}
TLS_SCHEMES = ("rediss", "amqps", "rediss+cluster")
# How long the probe of a plain URL's port may take. It runs only after a server dropped a plain
# connection at once (what a TLS-only port does with plain text), never on a refusal or timeout.
PROBE_TIMEOUT_S = 2.0
# OpenSSL's reasons for a TLS client that got plain text back (a TLS URL to a plain port).
_PLAIN_TEXT_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                       "HTTP_REQUEST", "UNKNOWN_PROTOCOL")


def check_ca_file(path: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a readable file of PEM CA certificates."""
    if not os.path.isfile(path):
        raise ConfigError(f"--tls-ca: no such file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"--tls-ca: cannot read {path} (permissions)")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"--tls-ca: {path} holds no PEM CA certificate ({exc})") from None


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS context of a client-side AMQP connection: TLS >= 1.2, CERT_REQUIRED, host name checked.

    It trusts the system's default CAs and, if given, the CAs in ``ca_file``: the same set that
    redis-py trusts with ``ssl_ca_certs``, so both servers are checked alike.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def uses_tls(url: str) -> bool:
    """True for a ``rediss://`` or ``amqps://`` URL."""
    return urlparse(url).scheme in TLS_SCHEMES


def server_address(url: str) -> tuple[str, int]:
    """(host, port) of a ``redis[s]://`` or ``amqp[s]://`` URL, with the scheme's default port."""
    parts = urlparse(url)
    default_port = _SCHEMES[parts.scheme][3] if parts.scheme in _SCHEMES else 0
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError(f"bad port in a {parts.scheme}:// URL") from None
    return parts.hostname or "localhost", port


def speaks_tls(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if ``host:port`` completes a TLS handshake (its certificate unchecked: only the
    protocol is asked, and nothing is sent inside). False when it refuses, times out or answers
    in plain text."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with probe.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def causes_of(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: __cause__/__context__ chains, exceptions held in ``args`` (pika's
    AMQPConnectionError carries the socket error as an argument) or in an ``exception`` attribute
    (where pika's connection workflow keeps the socket error of a failed phase)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        current = todo.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        wrapped = getattr(current, "exception", None)
        if isinstance(wrapped, BaseException):
            todo.append(wrapped)
        todo.extend(linked for linked in (current.__cause__, current.__context__) if linked is not None)
    return seen


def _dropped_at_once(causes: list[BaseException]) -> bool:
    """The server took the connection and then dropped it: what a TLS port does with plain text."""
    for cause in causes:
        if isinstance(cause, (ConnectionResetError, BrokenPipeError, pika.exceptions.StreamLostError,
                              pika.exceptions.IncompatibleProtocolError)):
            return True
        if isinstance(cause, redis.exceptions.ConnectionError) and "closed by server" in str(cause):
            return True
    return False


def tls_refusal(exc: BaseException, url: str) -> ConfigError | None:
    """If ``exc``, a failure to reach the server of ``url``, can never be cured by retrying, the
    :class:`ConfigError` that says why in one line; else None (an outage: retry).

    Three cases: the server's certificate was refused (unknown CA, expired, or not for this
    host); a TLS URL reached a port that answers in plain text; a plain URL reached a port that
    speaks only TLS (asked with one probe handshake, and only after the server dropped the
    connection at once). The message names host and port, never the URL's credentials.
    """
    scheme = urlparse(url).scheme
    if scheme not in _SCHEMES:
        return None
    service, tls_scheme, plain_scheme, _ = _SCHEMES[scheme]
    host, port = server_address(url)
    where = f"{service} at {host}:{port}"
    causes = causes_of(exc)
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = str(getattr(cause, "verify_message", None) or cause).rstrip(".")
            if "mismatch" in why.lower():
                return ConfigError(f"{where}: TLS certificate refused: it is not issued for {host} "
                                   f"({why}); connect by a name the certificate holds")
            if "expired" in why or "not yet valid" in why:
                return ConfigError(f"{where}: TLS certificate refused ({why}); the server needs a "
                                   "current certificate (or this machine's clock is wrong)")
            return ConfigError(f"{where}: TLS certificate refused ({why}); pass --tls-ca with the "
                               "CA bundle that signed the server's certificate")
    if scheme == tls_scheme:
        for cause in causes:
            reason = getattr(cause, "reason", None)  # not every SSLError has one (SSLEOFError)
            if isinstance(cause, ssl.SSLError) and reason in _PLAIN_TEXT_REASONS:
                return ConfigError(f"{where} does not speak TLS ({reason}): a {scheme}:// URL "
                                   "needs the server's TLS port")
        return None
    if _dropped_at_once(causes) and speaks_tls(host, port):
        return ConfigError(f"{where} speaks TLS only: use {tls_scheme}:// (with --tls-ca if its "
                           f"certificate is not signed by a system CA), not {plain_scheme}://")
    return None


class _RefusalAware:
    """Mixin of a redis-py connection class: a TLS refusal raises ConfigError, not ConnectionError.

    redis-py (and our callers) retry a ConnectionError as an outage; a refused certificate would
    then be retried for ever.
    """

    scheme = "redis"
    host: str
    port: int

    def connect(self) -> None:
        try:
            super().connect()  # type: ignore[misc]
        except (redis.exceptions.ConnectionError, OSError) as exc:
            host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
            refusal = tls_refusal(exc, f"{self.scheme}://{host}:{self.port}")
            if refusal is not None:
                raise refusal from exc
            raise


class RedisConnection(_RefusalAware, redis.connection.Connection):
    """A plain Redis connection that says so in one line when the port speaks only TLS."""


class RedisTlsConnection(_RefusalAware, redis.connection.SSLConnection):
    """A TLS Redis connection whose certificate refusals are configuration errors."""

    scheme = "rediss"
