"""Test fixtures on the real servers: a coordinator serving in a thread, and a run's lifetime.

The process harness and the servers' URLs live in :mod:`harness.processes`; deleting a run lives
in :mod:`coordinator.run_admin`.
"""

from __future__ import annotations

import queue
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import redis

import coordinator.cli as cli
from coordinator.commit_batch import CommitConfig
from coordinator.config import CoordinatorConfig
from coordinator.consumer import Delivery, DeltaConsumer, QueueConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.run_admin import delete_run_keys, delete_run_queues
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, new_run_name, wait_for
from shared.errors import ServiceUnavailable
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy, connect_redis
from shared.signing import SigningKey

# The tiny model on a small corpus: fast to build, to evaluate and to send deltas of.
SMALL_TASK = {"model_size": "tiny", "batch_size": 4, "eval_sequences": 4, "max_corpus_bytes": 1_000_000}
# The guard as served, but without distrust's trial on the operator's data and without the seed
# round: for tests that send made-up deltas to a guarded coordinator (a made-up delta has no
# training behind it, so it need not lower the loss, and the trial would refuse a run's first one;
# nor is it the size or direction of a real round, which the seed round would judge it against);
# real clients' deltas meet the default guard in the end-to-end tests and test_tls.py.
MADE_UP_DELTAS_GUARD = GuardConfig(distrust=False, seed_round=False)


def small_config(run: str, tmp_path: Path, **overrides: Any) -> CoordinatorConfig:
    """A coordinator of ``run`` on the tiny model as the in-thread tests serve it: open to the test's
    own senders, quick commits, a checkpoint under ``tmp_path``, 120 s at most, no delta guard (the
    deltas these tests send are made up, of random directions; the guard's own tests are
    test_guard.py, test_attacks.py, e2e/test_poisoned_client.py, and every end-to-end test runs
    it); ``overrides`` replace any field."""
    fields: dict[str, Any] = dict(
        auth=AuthMode.OPEN, run=run, task_settings=SMALL_TASK, guard=GuardConfig(mode="off"),
        commit=CommitConfig(every_updates=4, interval_s=0.3),
        connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
        checkpoint_dir=tmp_path / "ckpt", max_seconds=120,
    )
    fields.update(overrides)
    return CoordinatorConfig(**fields)


@contextmanager
def run_scope(prefix: str = "test") -> Iterator[str]:
    """A fresh run name; afterwards every Redis key and AMQP queue of the run is deleted.

    Whatever holds the run's lease then (a test may end with its coordinator killed, or serving):
    the run is the test's own. A broker that a test left stopped only leaves the queues behind.
    """
    run = new_run_name(prefix)
    try:
        yield run
    finally:
        keys = RunKeys(run)
        client = redis.Redis.from_url(REDIS_URL)
        try:
            delete_run_keys(client, keys)
        finally:
            client.close()
        with suppress(ServiceUnavailable):
            delete_run_queues(ConnectionSettings(amqp_url=AMQP_URL), keys)


def publish_to_queue(run: str, bodies: list[bytes], *,
                     properties: pika.BasicProperties | None = None) -> None:
    """Publish ``bodies`` straight to the run's delta queue, persistent and confirmed, as no client
    would (hostile input, repeats, parts out of order)."""
    properties = properties or pika.BasicProperties(delivery_mode=2)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", RunKeys(run).delta_queue, body, properties, mandatory=True)
    finally:
        connection.close()


@contextmanager
def consuming(run: str) -> Iterator[tuple[DeltaConsumer, queue.Queue[Delivery]]]:
    """The coordinator's consumer of ``run``'s delta queue on the real broker, alone (no
    coordinator): connected, with its inbox; stopped afterwards."""
    inbox: queue.Queue[Delivery] = queue.Queue()
    consumer = DeltaConsumer(connection=ConnectionSettings(amqp_url=AMQP_URL), keys=RunKeys(run),
                             config=QueueConfig(), retry=RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5),
                             inbox=inbox)
    consumer.start()
    try:
        assert consumer.connected.wait(15), f"the consumer did not connect (fatal: {consumer.fatal!r})"
        yield consumer, inbox
    finally:
        consumer.stop()
        consumer.join(10)


@contextmanager
def serving(config: CoordinatorConfig, *, signing_key: SigningKey | None = None) -> Iterator[Coordinator]:
    """A real coordinator serving ``config`` in a thread (consumer connected) until the block ends.

    It signs with ``signing_key`` (a new key if None); clients pin
    ``coordinator.signing_key.public_hex``.
    """
    client = connect_redis(config.connection)
    try:
        coordinator = Coordinator(config, redis=client, signing_key=signing_key or SigningKey.generate())
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
    finally:
        client.close()


@dataclass
class FakeCoordinator:
    """Stands in for coordinator.service.Coordinator: records how the CLI built it."""

    config: Any
    redis: Any
    crash: Any
    version: int = 0
    signing_key: Any = None

    def serve(self) -> None:
        self.version = 3

    def stop(self) -> None:
        pass


def stand_in_coordinator(monkeypatch: Any) -> list[FakeCoordinator]:
    """Make ``serve`` build :class:`FakeCoordinator` s (collected in the returned list) and keep
    pytest's own signal handlers: the ``fake_service`` fixture."""
    built: list[FakeCoordinator] = []

    def construct(config: Any, *, redis: Any, signing_key: Any, crash: Any) -> FakeCoordinator:
        built.append(FakeCoordinator(config, redis, crash, signing_key=signing_key))
        return built[-1]

    module = types.ModuleType("coordinator.service")
    module.Coordinator = construct  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "coordinator.service", module)
    monkeypatch.setattr(cli, "_install_signals", lambda stop: None)
    return built
