"""Several delta queues (``--delta-queues``, docs/SCALING.md) on the real servers: the coordinator
declares and consumes them all, the plan names how many there are, and each real client sends
every delta to the one its id picks."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest
import redis

from client.config import ClientConfig
from client.report import RoundReport
from client.worker import Worker
from coordinator.config import CommitConfig
from coordinator.consumer import QueueConfig
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from tests.services import serving, small_config

pytestmark = pytest.mark.integration
COUNT = 3


def consumers_of(name: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(name, passive=True).method.consumer_count)
    finally:
        connection.close()


def test_each_client_sends_to_its_queue_and_the_coordinator_takes_them_all(
    run_name: str, tmp_path: Path
) -> None:
    keys = RunKeys(run_name)
    queues = keys.delta_queues(COUNT)
    # one client for each queue, so that a delta sent to the first queue alone would show
    clients = {keys.delta_queue_for(f"c{i}", COUNT): f"c{i}" for i in range(50)}
    assert set(clients) == set(queues)
    config = small_config(run_name, tmp_path, queue=QueueConfig(count=COUNT),
                          commit=CommitConfig(every_updates=1, interval_s=0.3))
    key = SigningKey.generate()
    with serving(config, signing_key=key) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        assert all(consumers_of(q) == 1 for q in queues)  # one coordinator consumes each
        plan = SnapshotStore(redis.Redis.from_url(REDIS_URL), keys, verify_key=key.verify_key).read_plan()
        assert plan is not None and plan.delta_queues == COUNT
        reports: list[RoundReport] = []
        for queue_name, client_id in clients.items():
            settings = ClientConfig(
                run=run_name, client_id=client_id, device="cpu", threads=1, max_rounds=1,
                connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
                state_dir=tmp_path / client_id, retry=RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5),
                poll_s=0.2, include_wait_s=10.0, coordinator_key=key.public_hex)
            before = coordinator.consumer.delivered[queue_name]
            with Worker(settings) as worker:
                worker.run(on_round=reports.append)
            assert coordinator.consumer.delivered[queue_name] == before + 1, (queue_name, dict(
                coordinator.consumer.delivered))
        assert [r.fate.verdict and r.fate.verdict.applied for r in reports] == [True] * COUNT
        status = wait_for(lambda: (raw := redis.Redis.from_url(REDIS_URL).get(keys.status))
                          and json.loads(raw), what="the status")
        wait_for(lambda: coordinator.consumer.queue_depth == 0, what="every queue drained")
    assert status["queue"]["count"] == COUNT
    assert sum(coordinator.consumer.delivered[q] for q in queues) == COUNT
