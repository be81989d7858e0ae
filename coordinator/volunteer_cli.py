"""``asyncloco-coordinator invite | revoke | volunteers``: who may train a run.

Run on the coordinator's machine: these use the coordinator's own credentials (to create and delete
the volunteers' users) and its checkpoint directory (the volunteer book and the signing key). See
:mod:`coordinator.invites`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import click
import redis

from coordinator.invites import Servers, invite, revoke
from coordinator.options import option, run_checkpoint_dir, server_options, signing_key_path, tls_option
from coordinator.status import read_status
from coordinator.volunteers import VolunteerBook
from shared.errors import ConfigError, ServiceUnavailable
from shared.files import write_atomically
from shared.keys import RunKeys
from shared.settings import REDIS_ERRORS, ConnectionSettings, connect_redis
from shared.signing import KEY_FILE_NAME, SigningKey

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float | None:
    """``30d``, ``12h``, ``90m``, ``3600s`` → seconds; ``never`` → None."""
    if text.strip().lower() == "never":
        return None
    match = _DURATION.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--expires takes a duration like 30d, 12h, 90m or 'never', not {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _redis(redis_url: str, amqp_url: str, tls_ca: str | None) -> redis.Redis:
    return connect_redis(ConnectionSettings(redis_url=redis_url, amqp_url=amqp_url, socket_timeout_s=5.0,
                                            tls_ca_file=tls_ca))


def _run_options(command: Any) -> Any:
    command = tls_option()(command)
    command = option("--broker-admin", env="BROKER_ADMIN", default=None, metavar="URL",
                     help="RabbitMQ management API with the coordinator's credentials "
                     "[default: http://<--amqp's user:pass@host>:15672].")(command)
    command = server_options()(command)
    command = option("--checkpoint-dir", env="CHECKPOINT_DIR", default=None,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="The run's checkpoint directory: the volunteer book lives there "
                     "[default: ~/.local/state/asyncloco/coordinator/RUN].")(command)
    command = option("--run", env="RUN", default="default", help="Run name.")(command)
    return command


@click.command("invite")
@click.argument("name")
@_run_options
@option("--expires", env="INVITE_EXPIRES", default="30d",
        help="How long the invitation is good for (30d, 12h, 90m, or never).")
@option("--signing-key", env="SIGNING_KEY", default=None, type=click.Path(dir_okay=False, path_type=Path),
        help="The coordinator's signing key, whose public half goes into the token "
        f"[default: CHECKPOINT_DIR/{KEY_FILE_NAME}].")
@option("--public-redis", env="PUBLIC_REDIS", default=None, metavar="URL",
        help="Redis as volunteers reach it (credentials are replaced) [default: --redis].")
@option("--public-amqp", env="PUBLIC_AMQP", default=None, metavar="URL",
        help="RabbitMQ as volunteers reach it (credentials are replaced) [default: --amqp].")
@option("--token-file", env="TOKEN_FILE", default=None, type=click.Path(dir_okay=False, path_type=Path),
        help="Write the token to this file (mode 0600) instead of printing it.")
def invite_command(name: str, run: str, checkpoint_dir: Path | None, redis_url: str, amqp_url: str,
                   broker_admin: str | None, tls_ca: str | None, expires: str, signing_key: Path | None,
                   public_redis: str | None, public_amqp: str | None, token_file: Path | None) -> None:
    """Invite volunteer NAME: create its own broker and Redis users (publish deltas; read snapshots)
    and print the join token it passes to `asyncloco-client join`."""
    expires_s = parse_duration_s(expires)
    directory = run_checkpoint_dir(run, checkpoint_dir)
    servers = Servers(redis_url=redis_url, amqp_url=amqp_url, public_redis_url=public_redis or redis_url,
                      public_amqp_url=public_amqp or amqp_url, broker_admin_url=broker_admin,
                      tls_ca_file=tls_ca)
    ConnectionSettings(redis_url=servers.public_redis_url, amqp_url=servers.public_amqp_url)
    key = SigningKey.load_or_create(signing_key_path(signing_key, directory, run))
    client = _redis(redis_url, amqp_url, tls_ca)
    try:
        token = invite(run=run, name=name, servers=servers, redis_client=client,
                       book=VolunteerBook.open(directory), coordinator_key=key.public_hex,
                       expires_s=expires_s)
    finally:
        client.close()
    until = "never expires" if expires_s is None else f"good until {time.ctime(time.time() + expires_s)}"
    if token_file is not None:
        write_atomically(token_file, (token.encode() + "\n").encode())
        os.chmod(token_file, 0o600)
        click.echo(f"invited {name} to run {run} ({until}); join token written to {token_file}")
    else:
        click.echo(f"invited {name} to run {run} ({until}); give them this join token (a secret):",
                   err=True)
        click.echo(token.encode())


@click.command("revoke")
@click.argument("name")
@_run_options
def revoke_command(name: str, run: str, checkpoint_dir: Path | None, redis_url: str, amqp_url: str,
                   broker_admin: str | None, tls_ca: str | None) -> None:
    """Cut volunteer NAME off at once: its users are deleted, its connections closed, and the
    coordinator refuses its deltas (`revoked`) from now on."""
    directory = run_checkpoint_dir(run, checkpoint_dir)
    servers = Servers(redis_url=redis_url, amqp_url=amqp_url, public_redis_url=redis_url,
                      public_amqp_url=amqp_url, broker_admin_url=broker_admin, tls_ca_file=tls_ca)
    client = _redis(redis_url, amqp_url, tls_ca)
    try:
        done = revoke(run=run, name=name, servers=servers, redis_client=client,
                      book=VolunteerBook.open(directory))
    finally:
        client.close()
    click.echo(f"revoked {name}: Redis user {'deleted' if done.redis_user_existed else 'already gone'}, "
               f"{done.broker_connections_closed} broker connection(s) closed")


@click.command("volunteers")
@_run_options
def volunteers_command(run: str, checkpoint_dir: Path | None, redis_url: str, amqp_url: str,
                       broker_admin: str | None, tls_ca: str | None) -> None:
    """List the run's volunteers: invited when, until when, state, last seen, accepted, rejected."""
    book = VolunteerBook.open(run_checkpoint_dir(run, checkpoint_dir))
    clients: dict[str, dict[str, Any]] = {}
    client = _redis(redis_url, amqp_url, tls_ca)
    try:
        doc = read_status(client, RunKeys(run)) or {}
        clients = {c["client_id"]: c for c in doc.get("clients", [])}
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {redis_url} for the run's status ({exc})") from exc
    finally:
        client.close()
    if not book.volunteers:
        click.echo(f"no volunteers invited to run {run} (asyncloco-coordinator invite NAME)")
        return
    now = time.time()
    click.echo(f"{'volunteer':<24} {'state':<8} {'invited':<17} {'expires':<17} {'last seen':<17} "
               f"{'accepted':>8} {'rejected':>8}")
    for volunteer in sorted(book.volunteers.values(), key=lambda v: v.invited_at):
        refusal = volunteer.refusal(now)
        state = "active" if refusal is None else ("revoked" if volunteer.revoked_at else "expired")
        seen = clients.get(volunteer.name, {})
        click.echo(
            f"{volunteer.name:<24} {state:<8} {_when(volunteer.invited_at):<17} "
            f"{_when(volunteer.expires_at):<17} {_when(seen.get('last_seen')):<17} "
            f"{seen.get('updates', 0):>8} {seen.get('rejected', 0):>8}"
        )


def _when(unix: float | None) -> str:
    return "-" if not unix else time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))
