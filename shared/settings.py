"""Connection settings and the retry policy both sides use.

Defaults point at servers on 127.0.0.1 so that the commands work with no options on a developer box.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import pika
import pika.exceptions
import redis

from shared.errors import ConfigError
from shared.tls import (
    RedisConnection,
    RedisTlsConnection,
    check_ca_file,
    client_context,
    tls_refusal,
    uses_tls,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@dataclass(frozen=True)
class ConnectionSettings:
    """Where Redis and RabbitMQ are, and how patiently to talk to them."""

    redis_url: str = DEFAULT_REDIS_URL
    amqp_url: str = DEFAULT_AMQP_URL
    # AMQP heartbeat: a dead broker connection is noticed within about 2x this.
    heartbeat_s: int = 30
    socket_timeout_s: float = 10.0
    # PEM bundle of CAs that rediss:// and amqps:// servers are verified against, besides the
    # system's default CAs (None: those alone). Plain redis:// and amqp:// URLs do not use it.
    tls_ca_file: str | None = None

    def __post_init__(self) -> None:
        redis_url, amqp_url = urlparse(self.redis_url), urlparse(self.amqp_url)
        if redis_url.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"--redis must be a redis:// URL (rediss:// for TLS), got {redis_url.scheme}://...")
        if amqp_url.scheme not in ("amqp", "amqps"):
            raise ConfigError(f"--amqp must be an amqp:// URL (amqps:// for TLS), got {amqp_url.scheme}://...")
        # TLS is set by the scheme and --tls-ca alone: a URL's query could otherwise switch the
        # certificate check off (redis-py: ssl_cert_reqs=none; pika: ssl_options).
        if any(name.startswith("ssl") for name in parse_qs(redis_url.query)):
            raise ConfigError("--redis: TLS options do not go in the URL; use rediss:// and --tls-ca")
        if any(name.startswith("ssl") for name in parse_qs(amqp_url.query)):
            raise ConfigError("--amqp: TLS options do not go in the URL; use amqps:// and --tls-ca")
        if self.tls_ca_file is not None:
            check_ca_file(self.tls_ca_file)


# What a Redis outage looks like to redis-py: retried or waited out, never a crash.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def connect_redis(settings: ConnectionSettings) -> redis.Redis:
    """A Redis client for ``settings`` (connects lazily); the caller owns it and closes it.

    With a ``rediss://`` URL the server's certificate is required, checked against the system's
    CAs and ``settings.tls_ca_file``, and must name the URL's host. A refused certificate, or a
    plain URL to a TLS-only port, raises :class:`ConfigError` (see :func:`shared.tls.tls_refusal`)
    instead of a ConnectionError that would be retried as an outage.
    """
    tls: dict[str, object] = {}
    if uses_tls(settings.redis_url):
        tls = {"connection_class": RedisTlsConnection, "ssl_cert_reqs": "required",
               "ssl_check_hostname": True, "ssl_ca_certs": settings.tls_ca_file}
    elif urlparse(settings.redis_url).scheme == "redis":
        tls = {"connection_class": RedisConnection}
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,  # seconds; a PING before reusing an idle connection
        **tls,
    )


def amqp_parameters(settings: ConnectionSettings) -> pika.URLParameters:
    """pika connection parameters for ``settings.amqp_url``: the one place they are built.

    With an ``amqps://`` URL, TLS with :func:`shared.tls.client_context` (certificate required,
    host name checked, ``settings.tls_ca_file`` trusted). Callers add their own heartbeat,
    timeouts and connection name. A malformed URL raises :class:`ConfigError`.
    """
    try:
        params = pika.URLParameters(settings.amqp_url)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--amqp: bad URL ({exc})") from None
    if uses_tls(settings.amqp_url):
        params.ssl_options = pika.SSLOptions(client_context(settings.tls_ca_file),
                                             server_hostname=params.host)
    else:
        params.ssl_options = None
    return params


def open_amqp(settings: ConnectionSettings, params: pika.URLParameters) -> pika.BlockingConnection:
    """Open a blocking AMQP connection with ``params`` (from :func:`amqp_parameters` of ``settings``).

    A refused certificate, or a URL whose scheme does not match what the port speaks, raises
    :class:`ConfigError`; any other failure is pika's own (an outage that callers retry).
    """
    try:
        return pika.BlockingConnection(params)
    except (pika.exceptions.AMQPConnectionError, OSError) as exc:
        refusal = tls_refusal(exc, settings.amqp_url)
        if refusal is not None:
            raise refusal from exc
        raise


def redis_bytes(reply: object) -> bytes | None:
    """A GET/MGET reply of a client from :func:`connect_redis` (raw bytes, never decoded)."""
    if reply is None or isinstance(reply, bytes):
        return reply
    raise TypeError(f"expected bytes from Redis, got {type(reply).__name__}: use connect_redis()")


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter.

    If reconnect storms hammer a restarting broker, raise ``max_delay_s``; if a client takes
    too long to notice that a service is back, lower it.
    """

    initial_delay_s: float = 0.5
    max_delay_s: float = 15.0
    multiplier: float = 2.0
    # None: retry forever (a volunteer client); a number: give up after that many seconds.
    give_up_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.initial_delay_s <= 0 or self.max_delay_s < self.initial_delay_s:
            raise ConfigError("retry delays must satisfy 0 < initial_delay_s <= max_delay_s")
        if self.multiplier < 1:
            raise ConfigError("retry multiplier must be >= 1")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield the sleep before each retry; stops when ``give_up_after_s`` would be passed."""
        rng = rng or random.Random()
        ceiling = self.initial_delay_s
        spent = 0.0
        while True:
            delay = rng.uniform(ceiling / 2, ceiling)
            if self.give_up_after_s is not None and spent + delay > self.give_up_after_s:
                return
            spent += delay
            yield delay
            ceiling = min(self.max_delay_s, ceiling * self.multiplier)


def sleep_interruptibly(seconds: float, should_stop: Callable[[], bool] | None = None) -> bool:
    """Sleep up to ``seconds`` in small steps; return True early if ``should_stop()`` is true."""
    deadline = time.monotonic() + seconds
    while True:
        if should_stop is not None and should_stop():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.1))
