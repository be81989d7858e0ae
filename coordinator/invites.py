"""Invite, revoke, list: the operator's side of letting a stranger's machine into a run.

``invite`` creates the volunteer's own broker and Redis users (:mod:`coordinator.broker_admin`),
writes it into the volunteer book (:mod:`coordinator.volunteers`) and returns the join token
(:mod:`shared.join_token`) with the volunteer's URLs and the coordinator's public key. ``revoke``
marks it revoked in the book, deletes both users (the servers close its open connections at once)
and the serving coordinator refuses whatever it had queued. Only the operator's machine runs these:
they need the coordinator's own credentials, which never reach a volunteer.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import urllib.parse
from dataclasses import dataclass

import redis

from coordinator.broker_admin import BrokerAdmin, create_redis_user, delete_redis_user
from coordinator.volunteers import Volunteer, VolunteerBook, service_user
from shared.join_token import JoinToken
from shared.keys import RunKeys
from shared.settings import split_urls


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its user and password replaced (host, port, path and query kept); each URL of
    a comma-separated list (the nodes of a RabbitMQ cluster)."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(with_credentials(one, user, password) for one in urls)
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or "127.0.0.1"
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@"
    netloc += f"[{host}]" if ":" in host else host
    if parsed.port:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, ""))


@dataclass(frozen=True)
class Servers:
    """Where the coordinator talks to (its own credentials) and what volunteers are told."""

    redis_url: str  # the coordinator's
    amqp_url: str  # the coordinator's
    public_redis_url: str  # host and port volunteers reach Redis at (credentials are replaced)
    public_amqp_url: str
    broker_admin_url: str | None = None  # None: the management API beside the broker, port 15672
    tls_ca_file: str | None = None  # CAs the management API's https certificate is checked against

    def broker_admin(self) -> BrokerAdmin:
        return BrokerAdmin.for_amqp(self.amqp_url, self.broker_admin_url, ca_file=self.tls_ca_file)


def invite(*, run: str, name: str, servers: Servers, redis_client: redis.Redis, book: VolunteerBook,
           coordinator_key: str, expires_s: float | None = None) -> JoinToken:
    """Create volunteer ``name``'s users and book entry; return its join token."""
    keys = RunKeys(run)
    user = service_user(run, name)
    now = time.time()
    redis_password, broker_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    volunteer = Volunteer(name=name, user=user, invited_at=now,
                          expires_at=None if expires_s is None else now + expires_s,
                          redis_password_sha256=hashlib.sha256(redis_password.encode()).hexdigest())
    book.add(volunteer)  # first: refuses a name already in use before any user is touched
    create_redis_user(redis_client, user, keys, redis_password)
    servers.broker_admin().create_user(user, broker_password, keys)
    return JoinToken(
        run=run, client_id=name, coordinator_key=coordinator_key,
        redis=with_credentials(servers.public_redis_url, user, redis_password),
        amqp=with_credentials(servers.public_amqp_url, user, broker_password),
    )


@dataclass(frozen=True)
class Revocation:
    volunteer: Volunteer
    redis_user_existed: bool
    broker_connections_closed: int


def revoke(*, run: str, name: str, servers: Servers, redis_client: redis.Redis,
           book: VolunteerBook) -> Revocation:
    """Cut volunteer ``name`` off: book entry revoked, its users deleted, its connections closed."""
    volunteer = book.revoke(name)
    existed = delete_redis_user(redis_client, volunteer.user)
    closed = servers.broker_admin().delete_user(volunteer.user)
    return Revocation(volunteer, existed, closed)
