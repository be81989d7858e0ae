"""Redis loses every key of a run (a flush or a restart without persistence) under a live coordinator.

The coordinator (in a thread, on the real servers) must notice within a few seconds and put back
the current snapshot under the same version, the round plan, the status document and its own
lease; a reader racing the republish only ever gets a verified snapshot or SnapshotMissing /
SnapshotError; a version number never names two different models; a training client keeps going.
Only this run's keys are deleted (one DEL, atomic like FLUSHALL), never anyone else's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pytest
import redis
import torch

from client.config import ClientConfig
from client.report import RoundReport
from client.worker import Worker
from coordinator.checkpoint import load_checkpoint
from coordinator.config import CommitConfig, CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.lease import CoordinatorLease
from coordinator.registry import PlanConfig
from coordinator.run_admin import delete_run_keys
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.codecs import get_codec
from shared.errors import ConfigError, SnapshotError, SnapshotMissing
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings, RetryPolicy
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from tests.services import serving as services_serving

pytestmark = pytest.mark.integration

TASK = {"model_size": "tiny", "batch_size": 4, "eval_sequences": 4, "max_corpus_bytes": 1_000_000}
RECOVERY_BOUND_S = 5.0
log = logging.getLogger(__name__)


def publish(run: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", RunKeys(run).delta_queue, body, pika.BasicProperties(delivery_mode=2),
                              mandatory=True)
    finally:
        connection.close()


def honest_delta(store: SnapshotStore, *, client_id: str, seq: int) -> bytes:
    snap = store.read_latest()
    codec = get_codec("fp16")
    gen = torch.Generator().manual_seed(seq)
    tensors = {e.name: codec.encode(1e-3 * torch.randn(e.numel, generator=gen)) for e in snap.manifest.params}
    return DeltaMessage(
        run_id=snap.manifest.run_id, client_id=client_id, seq=seq, base_version=snap.version,
        local_steps=3, samples=12, tokens=5160, compute_s=1.0, train_loss=3.0, codec="fp16",
        tensors=tensors,
    ).encode()


class RacingReader(threading.Thread):
    """Reads the current snapshot in a tight loop and records what each read gave."""

    def __init__(self, keys: RunKeys) -> None:
        super().__init__(name="racing-reader", daemon=True)
        self.client = redis.Redis.from_url(REDIS_URL)
        self.store = SnapshotStore(self.client, keys)
        self.stop_event = threading.Event()
        self.hashes: dict[int, set[tuple[str, ...]]] = {}  # version -> chunk hashes seen for it
        self.reads = self.missing = self.refused = 0
        self.unexpected: list[BaseException] = []
        self.last: Any = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                snap = self.store.read()
            except SnapshotMissing:
                self.missing += 1
                continue
            except SnapshotError:
                self.refused += 1
                continue
            except BaseException as exc:  # noqa: BLE001 - recorded and failed on by the test
                self.unexpected.append(exc)
                return
            self.reads += 1
            self.hashes.setdefault(snap.version, set()).add(snap.manifest.chunk_sha256)
            self.last = snap

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self.client.close()
        assert not self.unexpected, f"reader got {self.unexpected[0]!r}"
        split = {v: h for v, h in self.hashes.items() if len(h) > 1}
        assert not split, f"versions that named two different models: {sorted(split)}"


@contextmanager
def serving(run: str, checkpoint_dir: Path, commit: CommitConfig) -> Iterator[Coordinator]:
    """A real coordinator serving ``run`` in a thread until the block ends."""
    config = CoordinatorConfig(
        auth=AuthMode.OPEN,
        run=run,
        task_settings=TASK,
        plan=PlanConfig(local_steps=3, min_local_steps=1),
        guard=GuardConfig(mode="off"),  # the deltas are random: no direction for the guard to judge
        commit=commit,
        connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
        checkpoint_dir=checkpoint_dir,
        max_seconds=120,
    )
    with services_serving(config) as coord:
        yield coord


@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    with serving(run_name, tmp_path / "ckpt", CommitConfig(every_updates=4, interval_s=0.3)) as coord:
        yield coord


def _recovered(client: redis.Redis, coord: Coordinator, keys: RunKeys, version: int) -> bool:
    status = client.get(keys.status)
    return (
        client.get(keys.current) == str(version).encode()
        and client.exists(keys.manifest(version)) == 1
        and client.get(keys.plan) is not None
        and status is not None
        and json.loads(status)["updated_at"] > 0
        and client.get(keys.coordinator_lease) == coord.lease.value.encode()
    )


def test_lease_refresh_takes_back_a_vanished_key_but_never_another_holders(
    redis_client: redis.Redis, run_name: str
) -> None:
    key = RunKeys(run_name).coordinator_lease
    lease = CoordinatorLease(redis_client, key, ttl_s=15)
    lease.acquire(wait_s=1)
    assert lease.refresh()
    redis_client.delete(key)  # Redis flushed under us
    assert lease.refresh()
    assert redis_client.get(key) == lease.value.encode()
    assert 0 < redis_client.ttl(key) <= 15
    redis_client.set(key, "elsewhere:1:abcd", ex=15)  # another coordinator took the run
    assert not lease.refresh()
    assert redis_client.get(key) == b"elsewhere:1:abcd"  # and it was left alone
    lease.release()
    assert redis_client.get(key) == b"elsewhere:1:abcd"


def test_a_coordinator_paused_past_its_lease_checks_it_before_committing(
    redis_client: redis.Redis, run_name: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    coord = Coordinator(CoordinatorConfig(
        auth=AuthMode.OPEN,
        run=run_name, task_settings=TASK, checkpoint_dir=ckpt,
        connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
    ), redis=redis_client, signing_key=SigningKey.generate())
    coord.setup()  # lease taken, version 0 checkpointed and published
    key = coord.keys.coordinator_lease
    try:
        # Paused (SIGSTOP, a VM migration) past the TTL: the lease expired and another took the run.
        redis_client.set(key, "elsewhere:1:abcd", ex=15)
        coord.lease.refreshed_at -= 60
        with pytest.raises(ConfigError, match="another coordinator took over"):
            coord._commit(force=True)
        assert load_checkpoint(ckpt).version == coord.version  # nothing was written
        assert redis_client.get(key) == b"elsewhere:1:abcd"
        # Only lapsed (nobody took it): taken back, and the commit goes on.
        redis_client.delete(key)
        coord.lease.refreshed_at -= 60
        coord.run.optimizer.theta_updates += 1  # as if a delta had been applied: a new version is due
        coord._commit()
        assert redis_client.get(key) == coord.lease.value.encode()
        assert load_checkpoint(ckpt).version == coord.version == 1
        # A version published meanwhile by someone else stops it as well.
        redis_client.set(coord.keys.current, coord.version + 5)
        coord.lease.refreshed_at -= 60
        with pytest.raises(ConfigError, match="published version"):
            coord._commit(force=True)
    finally:
        coord.lease.release()


def test_coordinator_republishes_snapshot_plan_status_and_lease(
    coordinator: Coordinator, run_name: str, redis_client: redis.Redis
) -> None:
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys)
    for seq in range(2):
        version = coordinator.version
        publish(run_name, honest_delta(store, client_id="c1", seq=seq))
        # published, not only committed: the next delta is computed on it (one per client per base)
        wait_for(lambda v=version: (store.current_version() or 0) > v, what=f"delta {seq} committed")
    version = coordinator.version
    wait_for(lambda: _recovered(redis_client, coordinator, keys, version), what="steady state")
    before = store.read()
    reader = RacingReader(keys)
    reader.start()
    recoveries = []
    try:
        for _ in range(3):
            time.sleep(0.3)
            assert delete_run_keys(redis_client, keys) >= 5  # current, manifest, chunk, plan, status, lease
            started = time.monotonic()
            wait_for(lambda: _recovered(redis_client, coordinator, keys, version),
                     timeout_s=RECOVERY_BOUND_S, what="snapshot, plan, status and lease republished")
            recoveries.append(time.monotonic() - started)
        wait_for(lambda: reader.last is not None and reader.last.version == version, what="a read after")
    finally:
        reader.finish()
    log.warning("Redis loss: recovered in %s s", ", ".join(f"{r:.2f}" for r in recoveries))
    after = store.read()
    assert after.version == version == coordinator.version
    assert after.manifest.run_id == before.manifest.run_id
    assert after.manifest.chunk_sha256 == before.manifest.chunk_sha256
    for name, tensor in after.params.items():
        assert torch.equal(tensor, coordinator.run.optimizer.params[name].detach())
    plan = SnapshotStore(redis_client, keys, verify_key=coordinator.signing_key.verify_key).read_plan()
    assert plan is not None and plan.run_id == coordinator.run.run_id and plan.local_steps == 3
    status = json.loads(redis_client.get(keys.status))
    assert status["version"] == version and status["coordinator"]["state"] == "serving"
    assert status["deltas"]["applied"] == 2
    assert reader.reads > 0 and reader.missing > 0  # the reader really raced the republishes
    # and it keeps serving: the next delta is applied on top
    publish(run_name, honest_delta(store, client_id="c1", seq=2))
    wait_for(lambda: coordinator.version == version + 1 and store.current_version() == version + 1,
             what="next delta committed and published")


def test_loss_that_spares_the_pointer_is_republished(
    coordinator: Coordinator, run_name: str, redis_client: redis.Redis
) -> None:
    # `current` survives but the snapshot under it is gone (a flush racing a publish's flip, or
    # keys evicted): the pointer names nothing readable, so the version is rewritten in place.
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys)
    publish(run_name, honest_delta(store, client_id="c3", seq=0))
    wait_for(lambda: coordinator.version == 1 and store.current_version() == 1, what="version 1")
    before = store.read()
    everything = redis_client.scan_iter(match=f"{keys.prefix}*", count=1000)
    spared = [k for k in everything if k != keys.current.encode()]
    redis_client.delete(*spared)
    with pytest.raises(SnapshotMissing):
        store.read()
    started = time.monotonic()
    wait_for(lambda: _recovered(redis_client, coordinator, keys, 1), timeout_s=RECOVERY_BOUND_S,
             what="version 1 rewritten under the surviving pointer")
    log.warning("pointer-spared loss recovered in %.2f s", time.monotonic() - started)
    after = store.read()
    assert after.version == 1 and after.manifest.chunk_sha256 == before.manifest.chunk_sha256


def test_loss_with_an_applied_uncommitted_delta_commits_it_as_a_new_version(
    run_name: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Commits are held back (5 s), so a delta is applied to θ but in no checkpoint yet when the
    # keys vanish. Republishing θ under the old number would make one version name two models;
    # the coordinator commits instead, and the old version never comes back with other bytes.
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys)
    slow = CommitConfig(every_updates=16, interval_s=5.0, idle_interval_s=5.0)
    with serving(run_name, tmp_path / "ckpt", slow) as coord:
        wait_for(lambda: store.current_version() == 0, what="version 0")
        v0 = store.read()
        reader = RacingReader(keys)
        reader.start()
        try:
            publish(run_name, honest_delta(store, client_id="c4", seq=0))
            wait_for(lambda: coord.run.intake.counts["applied"] == 1, what="applied, not yet committed")
            assert coord.version == 0 and coord.batch
            delete_run_keys(redis_client, keys)
            wait_for(lambda: _recovered(redis_client, coord, keys, 1), timeout_s=RECOVERY_BOUND_S,
                     what="version 1 published")
            assert not coord.batch  # committed: checkpointed and acknowledged
            wait_for(lambda: reader.last is not None and reader.last.version == 1, what="reader on v1")
        finally:
            reader.finish()  # fails if version 0 was ever seen with bytes other than v0's
        assert reader.hashes.get(0, {v0.manifest.chunk_sha256}) == {v0.manifest.chunk_sha256}
        v1 = store.read()
        assert v1.manifest.chunk_sha256 != v0.manifest.chunk_sha256
        for name, tensor in v1.params.items():
            assert torch.equal(tensor, coord.run.optimizer.params[name].detach())


def test_loss_while_deltas_arrive_never_reuses_a_version_number(
    coordinator: Coordinator, run_name: str, redis_client: redis.Redis
) -> None:
    # Deltas keep arriving while the run's keys vanish twice: whatever the coordinator puts back,
    # a version number always names one model (the reader checks every version it saw).
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys)
    reader = RacingReader(keys)
    reader.start()
    base = store.read_latest()
    try:
        bodies = []
        for seq in range(12):
            tensors_from = base  # a stale-by-a-few base is still accepted (max_staleness 32)
            codec = get_codec("fp16")
            gen = torch.Generator().manual_seed(100 + seq)
            bodies.append(DeltaMessage(
                run_id=tensors_from.manifest.run_id, client_id=f"c{seq}", seq=0,  # one per base
                base_version=tensors_from.version, local_steps=3, samples=12, tokens=2580,
                compute_s=0.5, train_loss=3.0, codec="fp16",
                tensors={e.name: codec.encode(1e-4 * torch.randn(e.numel, generator=gen))
                         for e in tensors_from.manifest.params},
            ).encode())
        for seq, body in enumerate(bodies):
            publish(run_name, body)
            if seq in (3, 8):
                delete_run_keys(redis_client, keys)
            time.sleep(0.1)
        wait_for(lambda: coordinator.run.intake.counts["applied"] == 12, what="all 12 applied")
        wait_for(lambda: not coordinator.batch
                 and _recovered(redis_client, coordinator, keys, coordinator.version),
                 what="the final version published")
        wait_for(lambda: reader.last is not None and reader.last.version == coordinator.version,
                 what="the reader sees the final version")
    finally:
        reader.finish()
    snap = store.read()
    for name, tensor in snap.params.items():
        assert torch.equal(tensor, coordinator.run.optimizer.params[name].detach())
    # the status document is rewritten at each housekeeping pass (every second): wait for the last
    status = wait_for(lambda: (s := json.loads(redis_client.get(keys.status) or b"{}"))
                      and s.get("deltas", {}).get("applied") == 12 and s, what="the status of all 12")
    assert status["deltas"]["rejected"] == 0


def test_client_keeps_training_through_the_loss(
    coordinator: Coordinator, run_name: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = RunKeys(run_name)
    config = ClientConfig(
        run=run_name, connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
        device="cpu", state_dir=tmp_path / "client", threads=1, max_rounds=6, client_id="survivor",
        retry=RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5), poll_s=0.2, include_wait_s=5.0,
        coordinator_key=coordinator.signing_key.public_hex,
    )
    reports: list[RoundReport] = []
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            with Worker(config) as worker:
                outcome["summary"] = worker.run(on_round=reports.append)
        except BaseException as exc:  # noqa: BLE001 - the test fails on it below
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(reports) >= 2, timeout_s=60, what="two rounds before the loss")
        applied_before = coordinator.run.intake.counts["applied"]
        delete_run_keys(redis_client, keys)
        thread.join(timeout=90)
    finally:
        if thread.is_alive():
            coordinator.stop()
    assert not thread.is_alive(), "the client did not finish its rounds"
    assert "error" not in outcome, f"client failed: {outcome.get('error')!r}"
    summary = outcome["summary"]
    assert summary.rounds == 6 and summary.deltas_sent == 6
    wait_for(lambda: coordinator.run.intake.counts["applied"] == 6, what="all 6 deltas applied")
    assert coordinator.run.intake.counts["applied"] > applied_before
    assert coordinator.run.intake.counts["rejected"] == 0
    assert [r.seq for r in reports] == sorted({r.seq for r in reports})  # no seq reused
    wait_for(lambda: _recovered(redis_client, coordinator, keys, coordinator.version), what="republished")


def test_store_republish_rewrites_the_same_version_but_never_goes_back(
    redis_client: redis.Redis, run_name: str
) -> None:
    store = SnapshotStore(redis_client, RunKeys(run_name), signer=SigningKey.generate())
    params = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    common: dict[str, Any] = dict(run_id="rid", params=params, config={}, progress={})
    store.publish(version=1, **common)
    with pytest.raises(SnapshotError):
        store.publish(version=1, **common)  # an ordinary publish never rewrites a version
    redis_client.delete(RunKeys(run_name).manifest(1), RunKeys(run_name).chunk(1, 0))
    store.publish(version=1, republish=True, **common)  # the keys under the pointer were lost
    assert torch.equal(store.read().params["w"], params["w"]) and store.current_version() == 1
    with pytest.raises(SnapshotError):
        store.publish(version=0, republish=True, **common)  # but never backwards
    assert store.current_version() == 1
