"""The dead-letter queue is a quorum queue (it outlives any one node of a cluster), and one that an
older version declared as a classic queue is used as it is, not a reason to stop (the real broker)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from contextlib import contextmanager

import pika
import pika.exceptions
import pytest

from coordinator.consumer import Delivery, DeltaConsumer, QueueConfig, dead_letter_queue_arguments
from coordinator.outcome import Outcome
from harness.processes import AMQP_URL, wait_for
from shared.keys import RunKeys
from tests.services import consuming, publish_to_queue

pytestmark = pytest.mark.integration

# what versions before the quorum dead-letter queue declared it with
CLASSIC_ARGUMENTS = {"x-max-length-bytes": QueueConfig().dead_letter_max_bytes, "x-overflow": "drop-head"}


@contextmanager
def _channel() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


def _declares(name: str, arguments: dict) -> int:
    """0 if ``name`` can be declared with ``arguments`` (it exists with those, or did not exist),
    else the broker's reply code (406: it exists with others)."""
    with _channel() as channel:
        try:
            channel.queue_declare(name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return exc.reply_code
    return 0


def _dead_letter(run: str, consumer: DeltaConsumer, inbox: queue.Queue[Delivery]) -> bytes:
    """Reject one undecodable delivery and return the body of the dead letter it left."""
    keys = RunKeys(run)
    publish_to_queue(run, [b"not a delta"])
    delivery = inbox.get(timeout=10)
    assert consumer.settle([(delivery, Outcome.rejected("undecodable", "test", "c1", 4))]) == 1
    with _channel() as channel:
        def get() -> bytes | None:
            method, _, body = channel.basic_get(keys.dead_letter_queue, auto_ack=True)
            return None if method is None else body
        body = wait_for(get, timeout_s=10, what="the dead letter")
    assert body is not None
    return body


def test_the_dead_letter_queue_is_a_quorum_queue(run_name: str) -> None:
    keys = RunKeys(run_name)
    with consuming(run_name) as (consumer, inbox):
        assert _dead_letter(run_name, consumer, inbox) == b"not a delta"
    # as declared: quorum, its byte limit dropping the oldest letters (RabbitMQ 3.10 takes drop-head
    # for a quorum queue); a classic queue of that name would refuse these arguments (406)
    assert _declares(keys.dead_letter_queue, dead_letter_queue_arguments(QueueConfig())) == 0
    assert _declares(keys.dead_letter_queue, CLASSIC_ARGUMENTS) == 406


def test_a_classic_dead_letter_queue_of_an_older_version_is_used_as_it_is(
    run_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = RunKeys(run_name)
    with _channel() as channel:
        channel.queue_declare(keys.dead_letter_queue, durable=True, arguments=CLASSIC_ARGUMENTS)
    with caplog.at_level(logging.WARNING, logger="coordinator.consumer"):
        with consuming(run_name) as (consumer, inbox):
            assert _dead_letter(run_name, consumer, inbox) == b"not a delta"
            assert consumer.reconnects == 0 and consumer.fatal is None
    warned = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.getMessage()]
    assert len(warned) == 1 and keys.dead_letter_queue in warned[0], warned
    assert _declares(keys.dead_letter_queue, CLASSIC_ARGUMENTS) == 0  # still the classic queue it was
