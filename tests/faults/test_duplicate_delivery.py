"""The broker delivers the same delta twice: it is applied once and the copy only acknowledged.

Two ways a real broker redelivers: a message requeued by a consumer that went away (here a raw
pika consumer that nacks it before the coordinator starts), and a consumer connection the broker
closes while a delivery is still unacknowledged (here ``rabbitmqctl close_connection`` on exactly
the coordinator's connection, found by its connection name).
"""

from __future__ import annotations

from pathlib import Path

import pika
import pytest
import redis
import torch

from harness.faults import (
    close_coordinator_connection,
    coordinator_args,
    queue_depth,
    status,
    verify_snapshot,
)
from harness.oracle import judge, read_committed
from harness.processes import AMQP_URL, REDIS_URL, Processes, wait_for
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.snapshot import SnapshotStore
from tests.services import publish_to_queue

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

DELTA_ID = "dup:0"

# The delta here is made up: no training behind it, so distrust's trial on the operator's data
# (the guard's default) would refuse it as a run's first delta, and the seed round's statistic
# (from a real round of training) would judge it against a real delta's size and direction.
MADE_UP = ("--no-guard-distrust", "--no-guard-seed-round")


def _delta_for_current_snapshot(run: str) -> bytes:
    """A small, valid delta (client ``dup``, seq 0) against the run's current snapshot."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        snap = SnapshotStore(client, RunKeys(run)).read_latest()
    finally:
        client.close()
    codec = get_codec("fp16")
    gen = torch.Generator().manual_seed(0)
    tensors = {e.name: codec.encode(1e-3 * torch.randn(e.numel, generator=gen)) for e in snap.manifest.params}
    return DeltaMessage(
        run_id=snap.manifest.run_id, client_id="dup", seq=0, base_version=snap.version, local_steps=5,
        samples=40, tokens=5160, compute_s=1.0, train_loss=3.0, codec="fp16", tensors=tensors,
    ).encode()


def _publish(run: str, body: bytes, copies: int) -> None:
    publish_to_queue(run, [body] * copies,
                     properties=pika.BasicProperties(delivery_mode=2, message_id=DELTA_ID))


def _started(procs: Processes, name: str, args: list[str], run: str, *, since_pid: int | None = None) -> None:
    wait_for(lambda: (s := status(run)).get("coordinator", {}).get("state") == "serving"
             and s["coordinator"]["pid"] != since_pid and s, 60, f"{name} to serve")


def test_a_requeued_copy_of_a_delivered_delta_is_applied_once(
    procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    serve = coordinator_args(run_name, ckpt, *MADE_UP)
    first = procs.start("coordinator-1", *serve)
    _started(procs, "coordinator-1", serve, run_name)
    assert procs.terminate(first) == 0  # the queue and snapshot v0 stay; nobody consumes now

    _publish(run_name, _delta_for_current_snapshot(run_name), copies=2)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:  # a consumer takes one copy and gives it back: the broker marks it redelivered
        channel = connection.channel()
        method, _, _ = channel.basic_get(RunKeys(run_name).delta_queue, auto_ack=False)
        assert method is not None
        channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()
    assert queue_depth(run_name) == 2

    second = procs.start("coordinator-2", *serve, "--resume")
    wait_for(lambda: len(read_committed(ckpt)) >= 2, 60, "both copies to be settled")
    assert procs.terminate(second) == 0, procs.logs()
    entries = read_committed(ckpt)
    assert sorted(e["outcome"] for e in entries) == ["applied", "duplicate"], entries
    verdict = judge({DELTA_ID}, entries)
    assert verdict.ok and verdict.applied[DELTA_ID] == 1, verdict.summary()
    assert queue_depth(run_name) == 0  # both copies acknowledged
    assert status(run_name)["deltas"]["applied"] == 1
    assert verify_snapshot(run_name) == status(run_name)["version"]


def test_a_delivery_redelivered_after_the_broker_closed_the_connection_is_applied_once(
    procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    # Commits wait 6 s, so the delivery is applied in memory but unacknowledged when the broker
    # drops the connection: its tag dies with the channel and the broker redelivers it.
    serve = coordinator_args(run_name, ckpt, *MADE_UP, "--commit-interval", "6", "--commit-idle", "6")
    coordinator = procs.start("coordinator", *serve)
    _started(procs, "coordinator", serve, run_name)
    _publish(run_name, _delta_for_current_snapshot(run_name), copies=1)
    wait_for(lambda: status(run_name).get("deltas", {}).get("applied") == 1, 10, "the delta applied")
    assert read_committed(ckpt) == []  # not committed yet
    close_coordinator_connection(run_name)

    wait_for(lambda: status(run_name)["deltas"]["duplicate"] == 1, 20, "the redelivery")
    wait_for(lambda: len(read_committed(ckpt)) == 2, 20, "the commit")
    assert status(run_name)["coordinator"]["amqp_reconnects"] >= 1
    assert procs.terminate(coordinator) == 0, procs.logs()
    entries = read_committed(ckpt)
    assert sorted(e["outcome"] for e in entries) == ["applied", "duplicate"], entries
    verdict = judge({DELTA_ID}, entries)
    assert verdict.ok and verdict.applied[DELTA_ID] == 1, verdict.summary()
    assert queue_depth(run_name) == 0  # the redelivered copy was acknowledged on the new channel
    assert verify_snapshot(run_name) == status(run_name)["version"] == 1
