"""Volunteer users on the servers: a RabbitMQ user that can only publish deltas, a Redis user that
can only read the run's snapshots.

RabbitMQ is administered through its management HTTP API (the ``rabbitmq_management`` plugin;
``deploy/services.sh`` enables it), so the coordinator's machine needs no shell on the broker's.
Redis through ``ACL SETUSER`` on the coordinator's own connection (its user needs ``+acl``).

What a volunteer may do, and nothing more:

* broker, in the run's vhost: configure nothing, read nothing, write only the run's delta exchange
  (``asyncloco.RUN.deltas.in``); at most 2 connections and 4 channels;
* Redis: ``GET``/``MGET``/``EXISTS`` on the run's ``current``, ``plan``, ``status`` and
  ``snapshot:*`` keys, ``XREAD`` (blocking or not) of its ``verdict:*`` streams, ``PING``,
  ``HELLO``, ``AUTH``, ``SELECT`` and ``CLIENT SETNAME``: no writes, no admin commands, no other
  run's keys.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from coordinator.volunteers import Volunteer
from shared.errors import ConfigError, ServiceUnavailable
from shared.keys import RunKeys
from shared.redis_cluster import on_every_node
from shared.settings import REDIS_ERRORS, split_urls
from shared.tls import client_context

log = logging.getLogger(__name__)

VOLUNTEER_MAX_CONNECTIONS = 2
VOLUNTEER_MAX_CHANNELS = 4
HTTP_TIMEOUT_S = 10.0
# What the client really calls: reads of the snapshot, plan and status; the connection's own set-up.
VOLUNTEER_REDIS_COMMANDS = ("get", "mget", "exists", "xread", "ping", "hello", "auth", "select",
                            "client|setname",
                            # a Redis Cluster client's start: the commands' key positions, the slots
                            "command", "cluster|slots", "cluster|shards")


def volunteer_redis_rules(keys: RunKeys, password: str = "", *, password_sha256: str = "") -> list[str]:
    """``ACL SETUSER`` rules: read-only access to the run's published keys, nothing else; the
    password given as itself or as its SHA-256 (hex)."""
    secret = f">{password}" if password else f"#{password_sha256}"
    published = [keys.current, keys.plan, keys.status, keys.snapshot_pattern, keys.verdicts("*")]
    return ["reset", "on", secret, *(f"%R~{k}" for k in published), "resetchannels", "-@all",
            *(f"+{c}" for c in VOLUNTEER_REDIS_COMMANDS)]


def restore_redis_users(client: redis.Redis, keys: RunKeys, volunteers: Iterable[Volunteer],
                        now: float) -> list[str]:
    """Create again the Redis users of the welcome ``volunteers`` that Redis no longer has (it
    restarted without an ACL file: users made by ``ACL SETUSER`` live in its memory only), from
    their passwords' hashes; return their names. Raises what the Redis client raises."""
    # the users every node has (each node of a cluster keeps its own)
    per_node = [{u.decode() if isinstance(u, bytes) else str(u) for u in users}
                for users in on_every_node(client, "ACL", "USERS")]
    present = set.intersection(*per_node) if per_node else set()
    restored = []
    for volunteer in volunteers:
        welcome = volunteer.refusal(now) is None and volunteer.redis_password_sha256
        if volunteer.user in present or not welcome:
            continue
        on_every_node(client, "ACL", "SETUSER", volunteer.user,
                      *volunteer_redis_rules(keys, password_sha256=volunteer.redis_password_sha256))
        restored.append(volunteer.name)
    return restored


def volunteer_broker_permissions(keys: RunKeys) -> dict[str, str]:
    """configure / write / read regexes of a volunteer: publish to the run's delta exchange only."""
    return {"configure": "^$", "write": f"^{re.escape(keys.delta_exchange)}$", "read": "^$"}


def create_redis_user(client: redis.Redis, user: str, keys: RunKeys, password: str) -> None:
    try:
        on_every_node(client, "ACL", "SETUSER", user, *volunteer_redis_rules(keys, password))
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable(f"cannot reach Redis to create user {user} ({exc})") from exc
    except redis.exceptions.ResponseError as exc:
        raise ConfigError(f"Redis refused to create user {user}: {exc} (the coordinator's Redis "
                          "user needs +acl)") from exc


def delete_redis_user(client: redis.Redis, user: str) -> bool:
    """Delete the user; Redis also closes every connection it authenticated. True if it existed."""
    try:
        return any(bool(deleted) for deleted in on_every_node(client, "ACL", "DELUSER", user))
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable(f"cannot reach Redis to delete user {user} ({exc})") from exc


@dataclass(frozen=True)
class BrokerAdmin:
    """The RabbitMQ management API at ``url`` (``http://USER:PASS@host:15672``), for one vhost."""

    url: str
    vhost: str
    ca_file: str | None = None  # for an https URL: CAs trusted besides the system's

    @classmethod
    def for_amqp(cls, amqp_url: str, admin_url: str | None = None, *,
                 ca_file: str | None = None) -> BrokerAdmin:
        """The admin API beside the broker of ``amqp_url`` (same host and credentials, port 15672;
        the first URL's of a list), or ``admin_url``; the vhost is the AMQP URL's."""
        parsed = urllib.parse.urlparse(split_urls(amqp_url)[0])
        vhost = urllib.parse.unquote(parsed.path[1:]) if len(parsed.path) > 1 else "/"
        if admin_url is None:
            user = urllib.parse.unquote(parsed.username or "guest")
            password = urllib.parse.unquote(parsed.password or "guest")
            auth = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@"
            scheme = "https" if parsed.scheme == "amqps" else "http"
            admin_url = f"{scheme}://{auth}{parsed.hostname or '127.0.0.1'}:15672"
        return cls(admin_url.rstrip("/"), vhost, ca_file)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 *, missing_ok: bool = False) -> Any:
        parsed = urllib.parse.urlparse(self.url)
        base = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 15672}"
        request = urllib.request.Request(base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode())
        creds = f"{urllib.parse.unquote(parsed.username or '')}:{urllib.parse.unquote(parsed.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
        request.add_header("Content-Type", "application/json")
        request.add_header("X-Reason", "asyncloco: volunteer revoked")
        try:
            context = client_context(self.ca_file) if parsed.scheme == "https" else None
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise ConfigError(f"RabbitMQ's management API refused {method} {path}: HTTP {exc.code} "
                              f"{exc.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceUnavailable(
                f"cannot reach RabbitMQ's management API at {base} ({exc}); enable the "
                "rabbitmq_management plugin (deploy/services.sh does) or pass --broker-admin"
            ) from None
        return json.loads(raw) if raw else None

    def _vhost(self) -> str:
        return urllib.parse.quote(self.vhost, safe="")

    def create_user(self, user: str, password: str, keys: RunKeys) -> None:
        """The volunteer's broker user: publish to the run's delta exchange, nothing else."""
        name = urllib.parse.quote(user, safe="")
        self._request("PUT", f"/api/users/{name}", {"password": password, "tags": ""})
        self._request("PUT", f"/api/permissions/{self._vhost()}/{name}", volunteer_broker_permissions(keys))
        self._request("PUT", f"/api/user-limits/{name}/max-connections", {"value": VOLUNTEER_MAX_CONNECTIONS})
        self._request("PUT", f"/api/user-limits/{name}/max-channels", {"value": VOLUNTEER_MAX_CHANNELS})

    def delete_user(self, user: str) -> int:
        """Delete the user and close its open connections; return how many were closed."""
        self._request("DELETE", f"/api/users/{urllib.parse.quote(user, safe='')}", missing_ok=True)
        return self.close_connections(user)

    def close_connections(self, user: str) -> int:
        connections = self._request("GET", "/api/connections?columns=name,user") or []
        closed = 0
        for connection in connections:
            if connection.get("user") == user:
                path = f"/api/connections/{urllib.parse.quote(connection['name'], safe='')}"
                self._request("DELETE", path, missing_ok=True)
                closed += 1
        return closed
