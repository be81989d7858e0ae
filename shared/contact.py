"""What a failure to reach Redis or RabbitMQ means: a permanent mistake, or an outage to wait out.

A :class:`ServerContact` is one process's dealings with one server. It remembers whether the
server ever let this process in, because the same failure means different things before it did
and after:

* credentials refused (Redis WRONGPASS, NOAUTH, NOPERM; AMQP ACCESS_REFUSED, no access to the
  vhost): :class:`AccessRefused` before, :class:`Revoked` after;
* the host name does not exist (DNS "no such name"): :class:`UnknownHost` before, an outage after;
* connection refused, or another kind of server answers (a reset on the first bytes, a reply
  that is not the protocol's): :class:`NoService` before, an outage after;
* anything else (timeouts, DNS "try again", a server going away mid-way): an outage, always.

So a typo in a URL ends the process at once with one line and its own exit code
(:class:`~shared.errors.PermanentError`), while a server that was there and went away is retried
with backoff for as long as it takes. Messages name host, port and user, never a password.

A list of broker URLs (``--amqp`` naming several nodes of one RabbitMQ cluster) is judged per URL
when none of them let the process in (:class:`~shared.settings.NoBrokerAnswered`), each failure
against its own host, port and user: a refusal of the credentials by any node is the answer
(users and permissions belong to the cluster, not to a node); any other mistake only if every
URL's failure is one (then the first URL's is reported), because a node that is down is what the
other URLs are there for.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import pika.exceptions
import redis
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

from shared.errors import AccessRefused, NoService, PermanentError, Revoked, UnknownHost
from shared.settings import NoBrokerAnswered, split_urls
from shared.tls import causes_of, server_address

# getaddrinfo's answers that mean "no such name" (EAI_AGAIN, "try again", is an outage).
_NO_SUCH_NAME = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}
# The credentials are refused, or the user may not do what the client asks of it.
_REFUSED_CREDENTIALS: tuple[type[BaseException], ...] = (
    redis.exceptions.AuthenticationError,  # WRONGPASS, NOAUTH (redis-py maps both here)
    redis.exceptions.NoPermissionError,  # NOPERM: the user may not read the run's keys
    pika.exceptions.ProbableAuthenticationError,  # ACCESS_REFUSED at login
    pika.exceptions.ProbableAccessDeniedError,  # no access to the vhost (or it does not exist)
    pika.exceptions.AuthenticationError,
)
# The address answers, but not as the server asked for (another service's port).
_WRONG_KIND: tuple[type[BaseException], ...] = (
    redis.exceptions.InvalidResponse,
    pika.exceptions.IncompatibleProtocolError,
    AMQPConnectorStackTimeout,  # no AMQP handshake within the stack timeout
    ConnectionResetError,  # dropped on the first bytes (TLS-only ports are told apart before this)
)


@dataclass(frozen=True)
class _Server:
    """Where one URL points, as messages name it (never its password)."""

    host: str
    port: int
    user: str | None

    @classmethod
    def of(cls, url: str) -> _Server:
        parsed = urlparse(url)
        host, port = server_address(url)
        return cls(host, port, unquote(parsed.username) if parsed.username else None)


class ServerContact:
    """One process's dealings with the server of ``url`` (``redis[s]://`` or ``amqp[s]://``; for
    ``--amqp`` a comma-separated list of a cluster's nodes, judged per URL as the module says).

    Call :meth:`answered` after every success; :meth:`refusal` says what a failure means.
    ``option`` is the command-line option that sets the URL, named in messages, with the join
    token unless ``token`` is False (the coordinator's own URLs come from options alone).
    ``host``, ``port`` and ``user`` are the (first) URL's.
    """

    def __init__(self, url: str, *, option: str, token: bool = True) -> None:
        self.service = "Redis" if urlparse(url).scheme.startswith("redis") else "RabbitMQ"
        self.servers = [_Server.of(one) for one in split_urls(url)]
        self.host, self.port, self.user = self.servers[0].host, self.servers[0].port, self.servers[0].user
        self.option = option
        self.source = f"the join token or {option}" if token else option  # where to fix the URL
        self.ever_answered = False

    def answered(self) -> None:
        """The server let this process in (a command or a connection succeeded)."""
        self.ever_answered = True

    def refusal(self, exc: BaseException) -> PermanentError | None:
        """The permanent mistake that ``exc``, a failure to talk to the server, reveals; None for an
        outage (the caller retries)."""
        if not isinstance(exc, NoBrokerAnswered):
            return self._refusal(exc, self.servers[0])
        refusals = [self._refusal(failure, server)
                    for failure, server in zip(exc.failures, self.servers, strict=False)]
        credentials = next((r for r in refusals if isinstance(r, (AccessRefused, Revoked))), None)
        if credentials is not None:
            return credentials
        return refusals[0] if all(r is not None for r in refusals) else None

    def _refusal(self, exc: BaseException, server: _Server) -> PermanentError | None:
        """:meth:`refusal` of a failure to talk to ``server`` alone."""
        chain = causes_of(exc)
        host, port = server.host, server.port
        where = f"{self.service} at {host}:{port}"
        refused = next((c for c in chain if isinstance(c, _REFUSED_CREDENTIALS)), None)
        if refused is not None and not _over_a_limit(refused):
            why = _short(refused)
            who = f"user {server.user!r}" if server.user else "this client (no user in the URL)"
            if self.ever_answered:
                return Revoked(f"{where} no longer lets {who} in ({why}), after it did earlier: this "
                               "volunteer's invitation was revoked or has expired; ask the run's "
                               "operator for a new join token")
            if isinstance(refused, pika.exceptions.ProbableAccessDeniedError):
                return AccessRefused(f"{where} refused {who} the virtual host ({why}): check the vhost "
                                     f"(the URL's path) in {self.source}")
            return AccessRefused(f"{where} refused {who} ({why}): check the user and password in "
                                 f"{self.source}")
        if self.ever_answered:
            return None  # it was there: whatever this is, it is an outage
        for cause in chain:
            if isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_NAME:
                return UnknownHost(f"unknown host {host!r} for {self.service} ({cause.strerror}): "
                                   f"check the host name in {self.source}")
        if any(isinstance(c, ConnectionRefusedError) for c in chain):
            return NoService(f"nothing listens at {host}:{port} for {self.service} (connection "
                             f"refused): check the port in {self.source}, and that "
                             f"the server is running")
        wrong = next((c for c in chain if isinstance(c, _WRONG_KIND)), None)
        if wrong is not None:
            return NoService(f"{host}:{port} answers, but not as {self.service} "
                             f"({type(wrong).__name__}): check the port in {self.source}")
        return None


def _over_a_limit(exc: BaseException) -> bool:
    """RabbitMQ refuses a user over its connection or channel limit as it refuses a stranger; that
    is another process of the same volunteer holding them, not a wrong password: wait."""
    return "limit" in str(exc).lower() and isinstance(exc, pika.exceptions.ProbableAccessDeniedError)


def _short(exc: BaseException) -> str:
    """The server's own words, on one line and not too long."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
