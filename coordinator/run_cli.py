"""``asyncloco-coordinator status | delete-run``: an operator's view of a run on the servers, and its end.

Both read (or clear) what a run keeps in Redis and RabbitMQ, from any machine that can reach them;
they give up on an unreachable server after :data:`ADMIN_TIMEOUT_S` with one line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import redis

from coordinator.options import option, server_options, tls_option
from coordinator.status import read_status, render_text
from shared.errors import ConfigError, ServiceUnavailable
from shared.keys import MAX_DELTA_QUEUES, RunKeys, validate_run_name
from shared.settings import ConnectionSettings, amqp_parameter_list, connect_redis, open_amqp

# Operator commands (status, delete-run) give up on an unreachable Redis after this long.
ADMIN_TIMEOUT_S = 5.0
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# `status --watch` without a number: seconds between prints.
WATCH_DEFAULT_S = 2.0


def redis_refused(url: str, exc: redis.exceptions.ResponseError) -> ConfigError:
    """A Redis that answers but refuses a command (e.g. the URL's database index is one it does not
    have): one line that says so."""
    hint = (" (the /N at the end of the URL picks a database; a server has 16 by default, 0-15)"
            if "DB index" in str(exc) else "")
    return ConfigError(f"Redis at {url} refused: {exc}{hint}")


@click.command("status")
@option("--run", env="RUN", default="default", help="Run name.")
@option("--json", "as_json", env="STATUS_JSON", is_flag=True,
        help="Print the stable JSON document (with --watch: one document a line).")
@option("--watch", "watch_s", env="STATUS_WATCH", type=click.FloatRange(0.1), is_flag=False,
        flag_value=WATCH_DEFAULT_S, default=None, metavar="[SECONDS]",
        help=f"Print the status again every SECONDS ({WATCH_DEFAULT_S:g} if not given) until Ctrl-C.")
@option("--count", env="STATUS_COUNT", type=click.IntRange(0), default=0,
        help="With --watch: stop after this many prints (0 = until Ctrl-C).")
@server_options(amqp_help="RabbitMQ URL, or several nodes' URLs separated by commas (for the live queue "
                          "depth).")
@tls_option()
def status_command(run: str, as_json: bool, watch_s: float | None, count: int, redis_url: str, amqp_url: str,
           tls_ca: str | None) -> None:
    """Show a run: version, eval loss history, clients, rejections, queue depth."""
    keys = RunKeys(run)
    servers = ConnectionSettings(redis_url=redis_url, amqp_url=amqp_url, tls_ca_file=tls_ca,
                                 socket_timeout_s=ADMIN_TIMEOUT_S)
    if watch_s is None:
        doc = _status_doc(servers, keys)
        click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else render_text(doc))
        return
    on_terminal = sys.stdout.isatty()
    shown = 0
    try:
        while True:
            doc = _status_doc(servers, keys)
            if as_json:
                click.echo(json.dumps(doc, sort_keys=True))
            else:
                if on_terminal:
                    click.clear()
                elif shown:
                    click.echo()  # off a terminal: one blank line between prints
                click.echo(render_text(doc))
            shown += 1
            if count and shown >= count:
                return
            time.sleep(watch_s)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: no error


def _status_doc(servers: ConnectionSettings, keys: RunKeys) -> dict[str, Any]:
    """The run's status document from Redis, with the queue depth as the broker counts it now."""
    client = connect_redis(servers)
    try:
        doc = read_status(client, keys)
    except REDIS_DOWN as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {servers.redis_url} ({exc})") from exc
    except redis.exceptions.ResponseError as exc:
        raise redis_refused(servers.redis_url, exc) from exc
    finally:
        client.close()
    if doc is None:
        raise ConfigError(f"no status for run {keys.run!r}: no coordinator has served it on this Redis")
    depth = _live_queue_depth(servers, keys)
    if depth is not None:
        doc["queue"]["depth"] = depth
    return doc


@click.command("delete-run")
@click.argument("run")
# --yes and --force read no environment variable on purpose: consent to delete a run is given on
# the command line that deletes it, never inherited from a shell.
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True,
              help="Delete even while a coordinator holds the run's lease (stop it first if you can).")
@server_options()
@tls_option()
def delete_run_command(run: str, yes: bool, force: bool, redis_url: str, amqp_url: str,
                       tls_ca: str | None) -> None:
    """Delete every Redis key (snapshots, plan, status, lease) and queue of run RUN.

    Refused while a coordinator serves the run, unless --force. Checkpoints on disk are kept.
    """
    validate_run_name(run)
    servers = ConnectionSettings(redis_url=redis_url, amqp_url=amqp_url, tls_ca_file=tls_ca,
                                 socket_timeout_s=ADMIN_TIMEOUT_S)
    client = connect_redis(servers)
    try:
        # Reach Redis before asking: a confirmed deletion that then cannot start helps nobody.
        client.ping()
        if not yes and not click.confirm(f"Delete every Redis key and queue of run {run}?"):
            raise click.ClickException(f"nothing deleted: run {run} kept")
        from coordinator.run_admin import delete_run

        deletion = delete_run(client, servers, run, force=force)
    except REDIS_DOWN as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {redis_url} ({exc})") from exc
    except redis.exceptions.ResponseError as exc:
        raise redis_refused(redis_url, exc) from exc
    finally:
        client.close()
    queues = ", ".join(deletion.queues_deleted) or "none"
    click.echo(f"deleted run {run}: {deletion.keys_deleted} Redis keys; queues: {queues}")


def _live_queue_depth(servers: ConnectionSettings, keys: RunKeys) -> int | None:
    """The delta queues' depth as the broker counts it now (every queue of the run that exists);
    None if the broker cannot say.

    A refused TLS certificate is not "cannot say": it raises ConfigError (one line, exit 1).
    """
    import pika.exceptions

    try:
        candidates = amqp_parameter_list(servers)  # every node of a list, in order
        for params in candidates:
            params.socket_timeout = 3
            params.blocked_connection_timeout = 3
            params.connection_attempts = 1
        connection = open_amqp(servers, candidates)
        try:
            depth, channel = 0, connection.channel()  # one channel: the first 404 ends the count
            for index, name in enumerate(keys.delta_queues(MAX_DELTA_QUEUES)):
                try:
                    depth += int(channel.queue_declare(name, passive=True).method.message_count)
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code != 404 or index == 0:
                        raise
                    break  # the run has no more queues (a 404 closed that channel only)
            return depth
        finally:
            connection.close()
    except (pika.exceptions.AMQPError, OSError):
        return None
