"""Real Redis and RabbitMQ for integration and end-to-end tests.

Tests talk to the real servers on 127.0.0.1. If one is not reachable, ``deploy/services.sh up``
is run once to start (or install) it; if that fails the tests fail with its message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pika
import pika.exceptions
import redis

from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from shared.keys import RunKeys

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("ASYNCLOCO_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("ASYNCLOCO_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def ensure_services() -> None:
    if reachable(6379) and reachable(5672):
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


def wait_for(predicate: Callable[[], T], timeout_s: float = 20.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@contextmanager
def serving(config: CoordinatorConfig) -> Iterator[Coordinator]:
    """A real coordinator serving ``config`` in a thread (consumer connected) until the block ends."""
    coordinator = Coordinator(config)
    thread = threading.Thread(target=coordinator.serve, daemon=True)
    thread.start()
    wait_for(lambda: coordinator.consumer is not None and coordinator.consumer.connected.is_set(),
             what="the coordinator's consumer")
    try:
        yield coordinator
    finally:
        coordinator.stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the coordinator did not stop"


class Processes:
    """Start processes and end exactly those (by their own handles), whatever happens in a test."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", ASYNCLOCO_REDIS=REDIS_URL,
                        ASYNCLOCO_AMQP=AMQP_URL, PYTHONPATH=str(ROOT))

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "a")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        """Every log, each under its name: the message of a failed assertion."""
        paths = sorted(self.logdir.glob("*.log"))
        return "\n".join(f"----- {p.name}\n{p.read_text()[-4000:]}" for p in paths)

    def terminate(self, proc: subprocess.Popen, timeout_s: float = 30) -> int:
        """SIGTERM ``proc`` (a clean stop: the coordinator commits) and return its exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"process {proc.pid} ignored SIGTERM for {timeout_s:.0f}s") from None

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
