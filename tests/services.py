"""Real Redis and RabbitMQ for integration and end-to-end tests.

Tests talk to the real servers on 127.0.0.1. If one is not reachable, ``deploy/services.sh up``
is run once to start (or install) it; if that fails the tests fail with its message.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pika.exceptions
import redis

from shared.keys import RunKeys

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("ASYNCLOCO_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("ASYNCLOCO_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def ensure_services() -> None:
    if _reachable(6379) and _reachable(5672):
        return
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "services.sh"), "up"], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(f"could not start Redis/RabbitMQ: {result.stdout}{result.stderr}")


def new_run_name(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def delete_run(run: str) -> None:
    """Remove every Redis key and AMQP queue of ``run``."""
    keys = RunKeys(run)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stale = list(client.scan_iter(match=f"{keys.prefix}*", count=1000))
        if stale:
            client.delete(*stale)
    finally:
        client.close()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except pika.exceptions.AMQPError:
        return
    try:
        channel = connection.channel()
        for name in (keys.delta_queue, keys.dead_letter_queue):
            channel.queue_delete(name)
        channel.exchange_delete(keys.dead_letter_exchange)
    finally:
        connection.close()


@contextmanager
def run_scope(prefix: str = "test") -> Iterator[str]:
    run = new_run_name(prefix)
    try:
        yield run
    finally:
        delete_run(run)
