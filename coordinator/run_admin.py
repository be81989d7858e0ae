"""Deleting a run: every Redis key under its prefix, and its queues and dead-letter exchange.

The one place that knows what "all of a run" is on the servers (the names come from
:class:`~shared.keys.RunKeys`). Used by ``asyncloco-coordinator delete-run``, by the tests'
``run_scope`` and by the benchmarks, and by the soak's ``redis_loss`` fault (keys only). Never
FLUSHALL or a broad pattern: runs share one Redis and one broker.
"""

from __future__ import annotations

from dataclasses import dataclass

import pika
import pika.exceptions
import redis

from coordinator.lease import live_holder
from shared.errors import ConfigError, ServiceUnavailable
from shared.keys import MAX_DELTA_QUEUES, RunKeys
from shared.settings import REDIS_ERRORS, ConnectionSettings, amqp_parameter_list, open_amqp


@dataclass(frozen=True)
class RunDeletion:
    """What :func:`delete_run` removed: a count of Redis keys, and the AMQP names by name."""

    keys_deleted: int
    queues_deleted: list[str]


def delete_run_keys(client: redis.Redis, keys: RunKeys) -> int:
    """Delete every Redis key of the run (SCAN on ``keys.prefix``) in one DEL; return how many.

    One DEL, so a reader sees the whole run or none of it (the soak's ``redis_loss`` fault relies
    on that: it is Redis losing the run at once). Raises :class:`ServiceUnavailable` if Redis
    cannot be reached.
    """
    try:
        # a run name holds no glob characters (validate_run_name), so the prefix matches literally
        found = list(client.scan_iter(match=f"{keys.prefix}*", count=1000))
        return int(client.delete(*found)) if found else 0
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable(f"cannot reach Redis to delete run {keys.run}'s keys ({exc})") from exc


def delete_run_queues(servers: ConnectionSettings, keys: RunKeys) -> list[str]:
    """Delete the run's delta queue, dead-letter queue and dead-letter exchange; return those that existed.

    Messages still in the queues are dropped with them. Raises :class:`ServiceUnavailable` if no
    broker of ``servers.amqp_url`` (tried in order) can be reached, :class:`ConfigError` if one
    refuses TLS.
    """
    candidates = amqp_parameter_list(servers)
    where = ", ".join(f"{p.host}:{p.port}" for p in candidates)  # not the URLs: they may hold a password
    try:
        connection = open_amqp(servers, candidates)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise ServiceUnavailable(f"cannot reach RabbitMQ at {where} to delete run {keys.run}'s queues "
                                 f"({exc!r}); start it (make services) or pass its URL") from exc
    deleted: list[str] = []
    try:
        # queue.delete and exchange.delete succeed for a name that does not exist, so a passive
        # declare asks first (a 404 closes the channel: each name gets a fresh one).
        names = [(q, True) for q in keys.delta_queues(MAX_DELTA_QUEUES)]  # however many it used
        for name, is_queue in (*names, (keys.dead_letter_queue, True),
                               (keys.delta_exchange, False), (keys.dead_letter_exchange, False)):
            channel = connection.channel()
            try:
                if is_queue:
                    channel.queue_declare(name, passive=True)
                else:
                    channel.exchange_declare(name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    continue
                raise
            if is_queue:
                channel.queue_delete(name)
            else:
                channel.exchange_delete(name)
            channel.close()
            deleted.append(name)
    except (pika.exceptions.AMQPConnectionError, pika.exceptions.StreamLostError) as exc:
        raise ServiceUnavailable(f"lost RabbitMQ at {where} while deleting run {keys.run}'s queues "
                                 f"({exc!r})") from exc
    finally:
        if connection.is_open:
            connection.close()
    return deleted


def delete_run(
    client: redis.Redis, servers: ConnectionSettings, run: str, *, force: bool = False
) -> RunDeletion:
    """Delete run ``run`` from Redis and RabbitMQ: its snapshots, status, plan, lease and queues.

    Refused with :class:`ConfigError` while a coordinator holds the run's lease (a holder on this
    host whose process is gone does not count), unless ``force``: a coordinator serving on would
    write the run back, and its clients would find their queue gone. Keys go first, then queues.
    """
    keys = RunKeys(run)
    if not force:
        try:
            holder = live_holder(client, keys.coordinator_lease)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable(f"cannot reach Redis to delete run {run} ({exc})") from exc
        if holder is not None:
            raise ConfigError(f"a coordinator is serving run {run} (lease held by {holder}); stop it first")
    keys_deleted = delete_run_keys(client, keys)
    return RunDeletion(keys_deleted=keys_deleted, queues_deleted=delete_run_queues(servers, keys))

