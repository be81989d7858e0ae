"""Connection settings and the retry policy both sides use.

Defaults point at servers on 127.0.0.1 so that the commands work with no options on a developer box.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qs, unquote, urlparse

import pika
import pika.exceptions
import redis

from shared.errors import ConfigError
from shared.redis_cluster import CLUSTER_OUTAGES, CLUSTER_SCHEMES, LazyCluster, is_cluster_url
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
# A comma between two URLs: one followed by the next URL's scheme, so that a comma inside a URL
# (legal unencoded in a password) stays part of it.
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated list, in order (one URL, as it is, if there is no comma)."""
    return _URL_SEPARATOR.split(value)


@dataclass(frozen=True)
class ConnectionSettings:
    """Where Redis and RabbitMQ are, and how patiently to talk to them."""

    redis_url: str = DEFAULT_REDIS_URL
    # One broker URL, or several nodes of one RabbitMQ cluster separated by commas: each connect
    # and reconnect goes through them in order and uses the first that answers.
    amqp_url: str = DEFAULT_AMQP_URL
    # AMQP heartbeat: a dead broker connection is noticed within about 2x this.
    heartbeat_s: int = 30
    socket_timeout_s: float = 10.0
    # PEM bundle of CAs that rediss:// and amqps:// servers are verified against, besides the
    # system's default CAs (None: those alone). Plain redis:// and amqp:// URLs do not use it.
    tls_ca_file: str | None = None

    def __post_init__(self) -> None:
        redis_url = urlparse(self.redis_url)
        if redis_url.scheme not in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
            raise ConfigError(f"--redis must be a redis:// URL (rediss:// for TLS, redis+cluster:// for a "
                              f"Redis Cluster), got {redis_url.scheme}://...")
        # TLS is set by the scheme and --tls-ca alone: a URL's query could otherwise switch the
        # certificate check off (redis-py: ssl_cert_reqs=none; pika: ssl_options).
        if any(name.startswith("ssl") for name in parse_qs(redis_url.query)):
            raise ConfigError("--redis: TLS options do not go in the URL; use rediss:// and --tls-ca")
        urls = self.amqp_urls
        for index, url in enumerate(urls):
            _check_amqp_url(url, _amqp_option(index, len(urls)))
        # Nodes of one cluster: the same TLS or not, and the same user and vhost, so that a
        # failover changes neither the queues (the vhost's) nor the user_id a client's deltas
        # carry (RabbitMQ refuses a publish whose user_id is not the connection's user).
        identities = {(p.scheme, unquote(p.username or ""), _vhost(p.path)) for p in map(urlparse, urls)}
        if len({scheme for scheme, _, _ in identities}) > 1:
            raise ConfigError("--amqp: the URLs of the list must all be amqp:// or all amqps://")
        if len(identities) > 1:
            raise ConfigError("--amqp: the URLs of the list must name the same user and virtual host "
                              "(nodes of one RabbitMQ cluster)")
        if self.tls_ca_file is not None:
            check_ca_file(self.tls_ca_file)

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs of ``amqp_url``, in the order they are tried (one, unless a list)."""
        return split_urls(self.amqp_url)


def _amqp_option(index: int, count: int) -> str:
    """How messages name URL ``index`` of ``count`` given to --amqp."""
    return "--amqp" if count == 1 else f"--amqp (URL {index + 1} of {count})"


def _vhost(path: str) -> str:
    """The virtual host of an AMQP URL's path, as pika reads it ("/" when there is none)."""
    return unquote(path.split("/")[1]) if len(path) > 1 else "/"


def _check_amqp_url(url: str, option: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"{option} must be an amqp:// URL (amqps:// for TLS), got {parsed.scheme}://...")
    if any(name.startswith("ssl") for name in parse_qs(parsed.query)):
        raise ConfigError(f"{option}: TLS options do not go in the URL; use amqps:// and --tls-ca")


# What a Redis outage looks like to redis-py (a cluster's too): retried or waited out, never a crash.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                             *CLUSTER_OUTAGES)


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
    elif urlparse(settings.redis_url).scheme in ("redis", "redis+cluster"):
        tls = {"connection_class": RedisConnection}
    options: dict[str, object] = dict(
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,  # seconds; a PING before reusing an idle connection
        **tls,
    )
    if is_cluster_url(settings.redis_url):
        # The cluster client answers every command the plain one is asked here (shared/redis_cluster.py)
        return cast(redis.Redis, LazyCluster(settings.redis_url, **options))
    return redis.Redis.from_url(settings.redis_url, **options)


def amqp_parameters(settings: ConnectionSettings, index: int = 0) -> pika.URLParameters:
    """pika connection parameters for URL ``index`` of ``settings.amqp_url`` (the first by default;
    :func:`amqp_parameter_list` gives them all): the one place they are built.

    With an ``amqps://`` URL, TLS with :func:`shared.tls.client_context` (certificate required,
    host name checked, ``settings.tls_ca_file`` trusted). Callers add their own heartbeat,
    timeouts and connection name. A malformed URL raises :class:`ConfigError`.
    """
    urls = settings.amqp_urls
    url = urls[index]
    try:
        params = pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_amqp_option(index, len(urls))}: bad URL ({exc})") from None
    if uses_tls(url):
        params.ssl_options = pika.SSLOptions(client_context(settings.tls_ca_file),
                                             server_hostname=params.host)
    else:
        params.ssl_options = None
    return params


def amqp_parameter_list(settings: ConnectionSettings) -> list[pika.URLParameters]:
    """:func:`amqp_parameters` of every URL of ``settings.amqp_url``, in order: what
    :func:`open_amqp` tries, so that a (re)connect moves on from a node that is down."""
    return [amqp_parameters(settings, index) for index in range(len(settings.amqp_urls))]


class NoBrokerAnswered(pika.exceptions.AMQPConnectionError):
    """None of several broker URLs let :func:`open_amqp` connect.

    ``failures`` holds each URL's exception, in the order of the URLs. The message names each
    host and port (never a password); :class:`shared.contact.ServerContact` judges each failure
    against its own URL.
    """

    def __init__(self, failures: Sequence[tuple[pika.URLParameters, BaseException]]) -> None:
        self.failures = [exc for _, exc in failures]
        tried = "; ".join(f"{params.host}:{params.port}: {type(exc).__name__}: {_one_line(exc)}"
                          for params, exc in failures)
        super().__init__(f"no RabbitMQ node answered ({tried})")


def open_amqp(
    settings: ConnectionSettings, params: pika.URLParameters | Sequence[pika.URLParameters]
) -> pika.BlockingConnection:
    """Open a blocking AMQP connection through the first of ``params`` that answers, tried in order.

    ``params``: :func:`amqp_parameter_list` of ``settings`` (callers may tune each), or one of
    them, the first URL's, from :func:`amqp_parameters`. A refused certificate, or a URL whose
    scheme does not match what the port speaks, raises :class:`ConfigError` at once; any other
    failure is pika's own (an outage that callers retry): with one URL its exception, with several
    :class:`NoBrokerAnswered` once each has failed.
    """
    candidates = [params] if isinstance(params, pika.connection.Parameters) else list(params)
    urls = settings.amqp_urls
    assert 0 < len(candidates) <= len(urls), "params must come from amqp_parameters of these settings"
    # One BlockingConnection per URL rather than pika's own sequence of parameters: pika ends a
    # pass over the sequence at the first host name that does not resolve (without trying the
    # rest), and it takes connection_attempts from the last one; and each failure here is
    # judged against its own URL.
    failures: list[tuple[pika.URLParameters, BaseException]] = []
    for url, candidate in zip(urls, candidates, strict=False):  # params may be the first few URLs' only
        try:
            return pika.BlockingConnection(candidate)
        except (pika.exceptions.AMQPConnectionError, OSError) as exc:
            refusal = tls_refusal(exc, url)
            if refusal is not None:
                raise refusal from exc
            if len(candidates) == 1:
                raise
            failures.append((candidate, exc))
    raise NoBrokerAnswered(failures)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    return text if len(text) <= 200 else text[:197] + "..."


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
