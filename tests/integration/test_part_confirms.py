"""A delta in parts goes out with several parts awaiting the broker's confirm at once, on the real
RabbitMQ, and every guarantee of one-confirm-at-a-time holds: the parts arrive in order with their
message ids, a part the broker confirmed is not sent again, and through a full queue (nacks) or a
dropped connection the parts not yet confirmed go again until the whole delta is in the queue."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pika
import pytest

import client.confirms
from client.uploader import DeltaUploader
from coordinator.consumer import QueueConfig, declare_queues
from harness.processes import AMQP_URL
from shared.delta_parts import PART_TYPE, DeltaPart
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings, RetryPolicy
from tests.relay import OutageProxy

pytestmark = pytest.mark.integration

PART_BYTES = 64 * 1024
FAST_RETRY = RetryPolicy(initial_delay_s=0.05, max_delay_s=0.2)


@pytest.fixture
def channel() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


def delta(seq: int = 0, payload_bytes: int = 20 * PART_BYTES) -> DeltaMessage:
    return DeltaMessage(run_id="r", client_id="c", seq=seq, base_version=0, local_steps=1, samples=1,
                        tokens=1, compute_s=1.0, train_loss=1.0, codec="fp32",
                        tensors={"w": os.urandom(payload_bytes)})


def uploader(keys: RunKeys, *, amqp_url: str = AMQP_URL, max_unconfirmed: int = 4) -> DeltaUploader:
    return DeltaUploader(ConnectionSettings(amqp_url=amqp_url), keys=keys, retry=FAST_RETRY,
                         part_bytes=PART_BYTES, max_unconfirmed=max_unconfirmed)


def drain(channel: Any, queue: str) -> list[tuple[str, bytes]]:
    """Every message in ``queue`` now: (message id, body), in queue order."""
    got = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return got
        assert properties.type == PART_TYPE and properties.delivery_mode == 2
        got.append((properties.message_id, body))


def rebuilt(messages: list[tuple[str, bytes]], sent: DeltaMessage) -> None:
    """The parts put the delta together byte for byte."""
    parts = {DeltaPart.decode(body).index: DeltaPart.decode(body) for _, body in messages}
    body = b"".join(parts[i].data for i in range(len(parts)))
    assert body == sent.encode() and hashlib.sha256(body).digest() == parts[0].sha256


@pytest.fixture
def outstanding_at_publish(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many publishes were awaiting their confirm as each part was published."""
    seen: list[int] = []
    publish = client.confirms.ConfirmedChannel.publish

    def noting(self: client.confirms.ConfirmedChannel, **kwargs: Any) -> None:
        seen.append(self.outstanding)
        publish(self, **kwargs)

    monkeypatch.setattr(client.confirms.ConfirmedChannel, "publish", noting)
    return seen


@pytest.mark.parametrize("window", [1, 4])
def test_parts_go_with_up_to_the_window_unconfirmed_and_arrive_in_order_once(
    channel: Any, run_name: str, outstanding_at_publish: list[int], window: int
) -> None:
    keys = RunKeys(run_name)
    declare_queues(channel, keys, QueueConfig())
    sent = delta()
    up = uploader(keys, max_unconfirmed=window)
    try:
        upload = up.send(sent)
    finally:
        up.close()
    assert upload.confirmed
    messages = drain(channel, keys.delta_queue)
    count = len(messages)
    assert count == -(-len(sent.encode()) // PART_BYTES) >= 20
    assert [mid for mid, _ in messages] == [f"c:0/{i}" for i in range(count)]  # in order, each once
    rebuilt(messages, sent)
    assert len(outstanding_at_publish) == count  # none went twice
    most = max(outstanding_at_publish)  # awaiting their confirms as one more was published
    assert most == 0 if window == 1 else 0 < most <= window - 1


def test_a_full_queue_refuses_some_parts_and_only_those_go_again(
    channel: Any, run_name: str, outstanding_at_publish: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    keys = RunKeys(run_name)
    # room for about three parts: the broker nacks the rest until a consumer makes room
    declare_queues(channel, keys, QueueConfig(max_queue_bytes=3 * PART_BYTES))
    sent = delta()
    received: list[tuple[str, bytes]] = []
    done = threading.Event()

    def consume_slowly() -> None:  # its own connection: pika connections are not shared by threads
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        reader = connection.channel()
        time.sleep(0.5)
        while not done.is_set() or reader.queue_declare(keys.delta_queue, passive=True).method.message_count:
            received.extend(drain(reader, keys.delta_queue))
            time.sleep(0.1)
        connection.close()

    consumer = threading.Thread(target=consume_slowly, daemon=True)
    consumer.start()
    up = uploader(keys)
    try:
        upload = up.send(sent)
    finally:
        up.close()
        done.set()
        consumer.join(timeout=30)
    assert upload.confirmed
    count = -(-len(sent.encode()) // PART_BYTES)
    assert any("the broker refused the delta" in r.getMessage() for r in caplog.records)  # it was full
    assert len(outstanding_at_publish) > count  # some parts went again ...
    assert sorted(mid for mid, _ in received) == sorted(f"c:0/{i}" for i in range(count))  # ... once in all
    rebuilt(received, sent)


def test_a_connection_lost_mid_delta_sends_the_unconfirmed_parts_again_on_a_new_one(
    channel: Any, run_name: str, outstanding_at_publish: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = RunKeys(run_name)
    declare_queues(channel, keys, QueueConfig())
    proxy = OutageProxy(urlparse(AMQP_URL).port or 5672)
    proxy.up()
    amqp_url = urlparse(AMQP_URL)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    sent = delta()
    publish = client.confirms.ConfirmedChannel.publish

    def cut_at_the_sixth(self: client.confirms.ConfirmedChannel, **kwargs: Any) -> None:
        if len(outstanding_at_publish) == 6:
            proxy.down_for(0.5)  # parts are in flight, some confirmed, some not
        publish(self, **kwargs)

    monkeypatch.setattr(client.confirms.ConfirmedChannel, "publish", cut_at_the_sixth)
    up = uploader(keys, amqp_url=amqp_url)
    try:
        upload = up.send(sent)
    finally:
        up.close()
        proxy.down()
    assert upload.confirmed
    count = -(-len(sent.encode()) // PART_BYTES)
    messages = drain(channel, keys.delta_queue)
    ids = [mid for mid, _ in messages]
    assert set(ids) == {f"c:0/{i}" for i in range(count)}  # every part (a lost confirm may repeat one)
    # the ones in flight at the cut went again (a few: at most the window), the confirmed ones not
    assert count < len(outstanding_at_publish) <= count + 4 and len(ids) <= count + 4
    rebuilt(messages, sent)
