"""A real coordinator (in a thread) on the real servers: deltas in, acks and dead letters out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pika
import pytest
import redis
import torch

from coordinator.config import CommitConfig, CoordinatorConfig
from coordinator.consumer import QueueConfig, delta_queue_arguments
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings
from shared.snapshot import SnapshotStore
from tests.services import MADE_UP_DELTAS_GUARD, SMALL_TASK, publish_to_queue, serving, small_config

pytestmark = pytest.mark.integration



@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    with serving(small_config(run_name, tmp_path)) as coord:
        yield coord


def _good_delta(coord: Coordinator, *, client_id: str, seq: int, scale: float = 1e-3) -> bytes:
    snap = SnapshotStore(redis.Redis.from_url(REDIS_URL), coord.keys).read_latest()
    codec = get_codec("fp16")
    gen = torch.Generator().manual_seed(seq)
    tensors = {e.name: codec.encode(scale * torch.randn(e.numel, generator=gen))
               for e in snap.manifest.params}
    return DeltaMessage(
        run_id=snap.manifest.run_id, client_id=client_id, seq=seq, base_version=snap.version,
        local_steps=10, samples=40, tokens=5160, compute_s=1.0, train_loss=3.0, codec="fp16",
        tensors=tensors,
    ).encode()


def _status(run: str) -> dict:
    raw = redis.Redis.from_url(REDIS_URL).get(RunKeys(run).status)
    return json.loads(raw) if raw else {}


def _dead_letters(run: str) -> list[dict]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    headers = []
    try:
        channel = connection.channel()
        while True:
            method, props, _ = channel.basic_get(RunKeys(run).dead_letter_queue, auto_ack=True)
            if method is None:
                return headers
            headers.append(props.headers or {})
    finally:
        connection.close()


def test_deltas_are_applied_committed_and_acked(coordinator: Coordinator, run_name: str) -> None:
    start_version = coordinator.version
    before = {n: p.clone() for n, p in coordinator.run.optimizer.params.items()}
    publish_to_queue(run_name, [_good_delta(coordinator, client_id=f"c{i}", seq=0) for i in range(3)])
    status = wait_for(lambda: _status(run_name).get("deltas", {}).get("applied") == 3 and _status(run_name),
                      what="3 applied deltas in status")
    assert status["version"] > start_version
    assert {c["client_id"] for c in status["clients"]} == {"c0", "c1", "c2"}
    assert any(not torch.equal(coordinator.run.optimizer.params[n], before[n]) for n in before)
    # acked after the commit: nothing left in the queue, nothing redelivered
    wait_for(lambda: coordinator.consumer.queue_depth == 0, what="empty queue")
    snap = SnapshotStore(redis.Redis.from_url(REDIS_URL), coordinator.keys).read_latest()
    assert snap.version == coordinator.version
    name = snap.manifest.params[0].name
    assert torch.equal(snap.params[name], coordinator.run.optimizer.params[name])


def test_bad_deltas_are_rejected_counted_dead_lettered_and_service_goes_on(
    coordinator: Coordinator, run_name: str
) -> None:
    good = _good_delta(coordinator, client_id="honest", seq=0)
    bad = [
        b"",
        b"\x00\x01 not msgpack",
        _good_delta(coordinator, client_id="liar", seq=0)[:-100],  # truncated
        _good_delta(coordinator, client_id="liar", seq=1, scale=float("nan")),
        _good_delta(coordinator, client_id="liar", seq=2, scale=1e4),
    ]
    publish_to_queue(run_name, bad + [good, good])  # the honest delta twice: applied once
    status = wait_for(
        lambda: (s := _status(run_name)).get("deltas", {}).get("rejected") == 5
        and s["deltas"]["applied"] == 1 and s["deltas"]["duplicate"] == 1 and s,
        what="rejections in status",
    )
    assert status["deltas"]["rejected_by_reason"] == {
        "empty": 1, "undecodable": 1, "truncated": 1, "non_finite": 1, "norm_too_large": 1,
    }
    assert status["coordinator"]["state"] == "serving"
    letters = wait_for(lambda: _dead_letters(run_name), what="dead letters")
    reasons = sorted(h["x-asyncloco-reason"] for h in letters)
    assert reasons == ["empty", "non_finite", "norm_too_large", "truncated", "undecodable"]
    # and it still serves honest clients
    publish_to_queue(run_name, [_good_delta(coordinator, client_id="honest", seq=1)])
    wait_for(lambda: _status(run_name)["deltas"]["applied"] == 2, what="next honest delta")


def test_a_delta_queue_declared_with_other_arguments_is_used_as_it_is(run_name: str, tmp_path: Path) -> None:
    keys = RunKeys(run_name)
    older = delta_queue_arguments(keys, QueueConfig())
    del older["x-dead-letter-strategy"]  # as declared before at-least-once dead-lettering
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().queue_declare(keys.delta_queue, durable=True, arguments=older)
    finally:
        connection.close()
    config = CoordinatorConfig(
        auth=AuthMode.OPEN,
        run=run_name, task_settings=SMALL_TASK, commit=CommitConfig(every_updates=4, interval_s=0.3),
        connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
        checkpoint_dir=tmp_path / "ckpt", max_seconds=60, guard=MADE_UP_DELTAS_GUARD,
    )
    with serving(config) as coord:
        assert coord.consumer is not None and coord.consumer.fatal is None
        publish_to_queue(run_name, [_good_delta(coord, client_id="c0", seq=0)])
        wait_for(lambda: _status(run_name).get("deltas", {}).get("applied") == 1, what="the delta applied")


def test_a_fresh_run_seeds_its_guard_once_and_a_resumed_one_keeps_the_seed(run_name: str,
                                                                          tmp_path: Path) -> None:
    """The seed round (coordinator/seed_round.py) runs at a fresh start of a guarded run, and a
    resume takes the guard's statistics from the checkpoint instead of training another."""
    config = small_config(run_name, tmp_path, guard=GuardConfig())
    with serving(config) as coord:
        guard = coord.run.guard
        assert guard.trusted_start and len(guard.norms) == 1
        seeded = list(guard.norms)
    with serving(replace(config, resume=True)) as coord:
        assert coord.run.guard.trusted_start and list(coord.run.guard.norms) == seeded
