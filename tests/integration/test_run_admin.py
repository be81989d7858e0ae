"""Deleting a run on the real Redis and RabbitMQ: all of it, nothing of another run, never under a
coordinator that still serves it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
import redis

from coordinator.config import QueueConfig
from coordinator.consumer import declare_queues
from coordinator.lease import CoordinatorLease
from coordinator.run_admin import RunDeletion, delete_run, delete_run_keys, delete_run_queues
from harness.processes import AMQP_URL
from shared.errors import ConfigError, ServiceUnavailable
from shared.keys import RunKeys
from shared.settings import ConnectionSettings
from tests.services import run_scope

pytestmark = pytest.mark.integration

SERVERS = ConnectionSettings(amqp_url=AMQP_URL)  # where delete_run finds the run's queues


def _create_run(client: redis.Redis, keys: RunKeys) -> int:
    """Keys and queues as a serving coordinator leaves them (one message queued); return the key count."""
    client.set(keys.current, b"2")
    client.set(keys.manifest(2), b"manifest")
    client.set(keys.chunk(2, 0), b"chunk")
    client.set(keys.status, b"{}")
    client.set(keys.plan, b"plan")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        declare_queues(channel, keys, QueueConfig())
        channel.basic_publish("", keys.delta_queue, b"a delta nobody applied")
    finally:
        connection.close()
    return 5


def _queue_exists(name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def other_run() -> Iterator[str]:
    with run_scope("other") as run:
        yield run


def test_delete_run_removes_every_key_and_queue_of_the_run_and_nothing_else(
    redis_client: redis.Redis, run_name: str, other_run: str
) -> None:
    keys, other = RunKeys(run_name), RunKeys(other_run)
    created = _create_run(redis_client, keys)
    _create_run(redis_client, other)

    deleted = delete_run(redis_client, SERVERS, run_name)

    assert deleted == RunDeletion(keys_deleted=created, queues_deleted=[
        keys.delta_queue, keys.dead_letter_queue, keys.delta_exchange, keys.dead_letter_exchange])
    assert list(redis_client.scan_iter(match=f"{keys.prefix}*")) == []
    assert not _queue_exists(keys.delta_queue) and not _queue_exists(keys.dead_letter_queue)
    # the other run is untouched, its queued message included
    assert len(list(redis_client.scan_iter(match=f"{other.prefix}*"))) == created
    assert _queue_exists(other.delta_queue) and _queue_exists(other.dead_letter_queue)
    # deleting what is gone deletes nothing, and says so
    assert delete_run(redis_client, SERVERS, run_name) == RunDeletion(keys_deleted=0, queues_deleted=[])


def test_delete_run_is_refused_while_a_coordinator_holds_the_lease(
    redis_client: redis.Redis, run_name: str
) -> None:
    keys = RunKeys(run_name)
    created = _create_run(redis_client, keys)
    lease = CoordinatorLease(redis_client, keys.coordinator_lease)
    lease.acquire()  # held by this (live) process, as by a serving coordinator
    with pytest.raises(ConfigError, match=f"a coordinator is serving run {run_name} "
                                          f"\\(lease held by {lease.value}\\); stop it first"):
        delete_run(redis_client, SERVERS, run_name)
    assert redis_client.get(keys.current) == b"2" and _queue_exists(keys.delta_queue)

    deleted = delete_run(redis_client, SERVERS, run_name, force=True)
    assert deleted.keys_deleted == created + 1  # the lease went with the rest
    assert len(deleted.queues_deleted) == 4


def test_a_lease_left_by_a_dead_coordinator_on_this_host_does_not_block(
    redis_client: redis.Redis, run_name: str
) -> None:
    keys = RunKeys(run_name)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no process has now (a killed coordinator's)
    redis_client.set(keys.coordinator_lease, f"{socket.gethostname()}:{child.pid}:deadbeef", ex=15)
    assert delete_run(redis_client, SERVERS, run_name).keys_deleted == 1

    # a holder on another machine cannot be checked from here: it counts as serving
    redis_client.set(keys.coordinator_lease, "elsewhere.example:1234:deadbeef", ex=15)
    with pytest.raises(ConfigError, match="lease held by elsewhere.example:1234:deadbeef"):
        delete_run(redis_client, SERVERS, run_name)


def test_unreachable_servers_are_one_clear_service_error_without_the_password(run_name: str) -> None:
    keys = RunKeys(run_name)
    port = _free_port()
    with pytest.raises(ServiceUnavailable, match=f"cannot reach RabbitMQ at 127.0.0.1:{port}") as info:
        delete_run_queues(ConnectionSettings(
            amqp_url=f"amqp://guest:s3cret@127.0.0.1:{port}/%2F?connection_attempts=1"), keys)
    assert "s3cret" not in str(info.value)
    down = redis.Redis(port=_free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(ServiceUnavailable, match="cannot reach Redis"):
            delete_run_keys(down, keys)
    finally:
        down.close()
