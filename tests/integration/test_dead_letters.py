"""A rejected delivery is acked only once RabbitMQ confirmed its dead letter (the real broker).

The consumer's channel is in confirm mode and dead letters are published mandatory: when the
broker cannot take one (here the dead-letter queue was deleted under the coordinator), the
delivery stays unacked and comes back after the reconnect, which declares the dead-letter queue
again; it is never acked with its dead letter lost.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pika
import pytest

from coordinator.consumer import Delivery, DeltaConsumer
from coordinator.outcome import Outcome
from harness.processes import AMQP_URL, wait_for
from shared.keys import RunKeys
from tests.services import consuming, publish_to_queue

pytestmark = pytest.mark.integration


@pytest.fixture
def consumer(run_name: str) -> Iterator[tuple[DeltaConsumer, queue.Queue[Delivery]]]:
    with consuming(run_name) as started:
        yield started


def _ready(channel: pika.adapters.blocking_connection.BlockingChannel, name: str) -> int:
    return int(channel.queue_declare(name, passive=True).method.message_count)


def test_a_dead_letter_the_broker_did_not_take_leaves_the_delivery_unacked(
    run_name: str, consumer: tuple[DeltaConsumer, queue.Queue[Delivery]]
) -> None:
    coordinator, inbox = consumer
    keys = RunKeys(run_name)
    publish_to_queue(run_name, [b"not a delta"])
    delivery = inbox.get(timeout=10)
    probe = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = probe.channel()
        channel.queue_delete(keys.dead_letter_queue)  # the dead letter has nowhere to go now
        coordinator.settle([(delivery, Outcome.rejected("undecodable", "first try", "c1", 4))])
        again = inbox.get(timeout=20)  # not acked: the broker hands it out again after the reconnect
        assert again.body == b"not a delta" and again.redelivered
        assert coordinator.reconnects >= 1
        coordinator.settle([(again, Outcome.rejected("undecodable", "second try", "c1", 4))])
        method, props, body = wait_for(lambda: _get(channel, keys.dead_letter_queue), timeout_s=10,
                                       what="the dead letter")
        assert body == b"not a delta"
        assert props.headers["x-asyncloco-reason"] == "undecodable"
        assert props.headers["x-asyncloco-detail"] == "second try"
        assert props.delivery_mode == 2
        coordinator.stop()
        coordinator.join(10)
        # an unacked delivery would be back in the queue now that the consumer is gone
        assert _ready(channel, keys.delta_queue) == 0
        assert _ready(channel, keys.dead_letter_queue) == 0  # the one letter taken above, no copy
    finally:
        probe.close()


def _get(channel: pika.adapters.blocking_connection.BlockingChannel, name: str) -> tuple | None:
    method, props, body = channel.basic_get(name, auto_ack=True)
    return None if method is None else (method, props, body)
