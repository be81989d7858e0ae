"""Where a volunteer's credentials come from: the join token ``invite`` printed.

``asyncloco-client join TOKEN`` works, but a token on the command line is visible to every user of
the machine (``ps``); ``--token-file FILE`` or ``$ASYNCLOCO_TOKEN`` keep it private. The token
fills in the run, both URLs, the client id and the coordinator's key; an option given as well
must agree with it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shared.errors import ConfigError
from shared.join_token import MAX_TOKEN_CHARS, JoinToken


def read_token(argument: str | None, token_file: Path | None) -> JoinToken | None:
    """The token from the command line or a file (not both); None if neither gives one."""
    if argument and token_file is not None:
        raise ConfigError("give the join token once: as TOKEN or with --token-file, not both")
    if token_file is not None:
        try:
            if os.stat(token_file).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{token_file} is readable by other users; chmod 600 it (it holds "
                                  "your credentials)")
            text = token_file.read_text()[: MAX_TOKEN_CHARS + 1]
        except OSError as exc:
            raise ConfigError(f"cannot read the join token file {token_file}: {exc.strerror}") from exc
        return JoinToken.decode(text)
    return JoinToken.decode(argument) if argument else None


@dataclass(frozen=True)
class Joined:
    """The run, servers and identity a client uses, after the token and the options are merged."""

    run: str
    redis_url: str
    amqp_url: str
    client_id: str | None
    coordinator_key: str | None


def merge(token: JoinToken | None, *, run: str | None, redis_url: str | None, amqp_url: str | None,
          client_id: str | None, coordinator_key: str | None, defaults: Joined) -> Joined:
    """The token's values, with each option given explicitly (not None) checked against it."""
    if token is None:
        return Joined(run=run or defaults.run, redis_url=redis_url or defaults.redis_url,
                      amqp_url=amqp_url or defaults.amqp_url, client_id=client_id,
                      coordinator_key=coordinator_key)
    for name, given, theirs in (("--run", run, token.run), ("--client-id", client_id, token.client_id),
                                ("--coordinator-key", coordinator_key, token.coordinator_key)):
        if given is not None and given != theirs:
            raise ConfigError(f"{name} {given!r} differs from the join token's; leave it out")
    # An explicit --redis/--amqp replaces the token's URL, credentials and all (the same servers
    # under another host name, say).
    return Joined(run=token.run, redis_url=redis_url or token.redis, amqp_url=amqp_url or token.amqp,
                  client_id=token.client_id, coordinator_key=token.coordinator_key)


def snapshot_source(snapshot_url: str | None, redis_url: str) -> str:
    """The Redis URL the client reads from: the run's ``redis_url`` (the token's or ``--redis``), or
    ``snapshot_url`` (``--snapshot-url``), a read-only replica of it.

    The client only ever reads Redis, and what it reads is signed, so a replica serves it as well
    as the primary. A replica URL without a user takes ``redis_url``'s user and password (so the
    token's password stays off the command line; ACL users are not replicated: the operator
    creates them on the replica too), and one without a database number ``redis_url``'s. Those
    credentials are never sent in the clear to a replica when the run's Redis is reached over TLS.
    """
    if not snapshot_url:
        return redis_url
    replica, run = urlsplit(snapshot_url), urlsplit(redis_url)
    if replica.scheme not in ("redis", "rediss") or not replica.hostname:
        raise ConfigError(f"--snapshot-url must be a redis:// or rediss:// URL with a host, got "
                          f"{snapshot_url!r}")
    netloc, path = replica.netloc, replica.path
    if run.scheme in ("redis", "rediss"):
        if replica.username is None and replica.password is None and "@" in run.netloc:
            if run.scheme == "rediss" and replica.scheme != "rediss":
                raise ConfigError("--snapshot-url: the run's Redis is reached over TLS; name the replica "
                                  "with rediss:// so that the password is not sent in the clear")
            netloc = f"{run.netloc.rpartition('@')[0]}@{replica.netloc}"
        if path in ("", "/"):
            path = run.path
    return urlunsplit((replica.scheme, netloc, path, replica.query, ""))
