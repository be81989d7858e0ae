"""Snapshots in the real Redis: publish/read, expiry of old versions, a reader racing a publisher."""

from __future__ import annotations

import threading

import pytest
import redis
import torch

from shared.errors import SnapshotError, SnapshotMissing
from shared.keys import RunKeys
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore

pytestmark = pytest.mark.integration
KEY = SigningKey.generate()  # the stand-in coordinator's


def _params(value: float, n: int = 300_000) -> dict[str, torch.Tensor]:
    # every element of version v equals v: a mixed read would show two values
    return {"w": torch.full((n,), value), "b": torch.full((7, 3), value), "h": torch.full((5,), value).half()}


def test_publish_then_read_verifies_and_round_trips(redis_client: redis.Redis, run_name: str) -> None:
    store = SnapshotStore(redis_client, RunKeys(run_name), signer=KEY, verify_key=KEY.verify_key)
    with pytest.raises(SnapshotMissing):
        store.read()
    manifest = store.publish(run_id="r", version=0, params=_params(0.5), config={"task": "x"},
                             progress={"updates": 0}, chunk_bytes=64 * 1024)
    assert len(manifest.chunk_sha256) > 10
    snap = store.read()
    assert snap.version == 0 and snap.manifest.config == {"task": "x"}
    for name, tensor in _params(0.5).items():
        assert torch.equal(snap.params[name], tensor) and snap.params[name].dtype == tensor.dtype


def test_corrupted_chunk_is_detected(redis_client: redis.Redis, run_name: str) -> None:
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys, signer=KEY, verify_key=KEY.verify_key)
    store.publish(run_id="r", version=0, params=_params(1.0), config={}, progress={}, chunk_bytes=65536)
    redis_client.setrange(keys.chunk(0, 3), 10, b"\xff\xff")
    with pytest.raises(SnapshotError, match="sha256"):
        store.read()


def test_pointer_never_moves_backwards_and_old_versions_expire(
    redis_client: redis.Redis, run_name: str
) -> None:
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys, keep_versions=2, expire_grace_s=30, signer=KEY)
    for v in range(4):
        store.publish(run_id="r", version=v, params=_params(float(v), 1000), config={}, progress={})
    assert store.current_version() == 3
    assert 0 < redis_client.ttl(keys.manifest(1)) <= 30  # 3 - keep_versions
    assert redis_client.ttl(keys.manifest(2)) == -1  # kept without expiry
    with pytest.raises(SnapshotError, match="already points"):
        store.publish(run_id="r", version=2, params=_params(9.0, 1000), config={}, progress={})
    assert store.current_version() == 3


def test_reader_racing_a_publisher_never_sees_a_torn_or_mixed_snapshot(
    redis_client: redis.Redis, run_name: str
) -> None:
    keys = RunKeys(run_name)
    writer = SnapshotStore(redis_client, keys, keep_versions=1, expire_grace_s=1, signer=KEY)
    reader = SnapshotStore(redis.Redis(connection_pool=redis_client.connection_pool), keys,
                           verify_key=KEY.verify_key)
    writer.publish(run_id="r", version=0, params=_params(0.0), config={}, progress={}, chunk_bytes=65536)
    done = threading.Event()
    errors: list[BaseException] = []

    def publish_many() -> None:
        try:
            for v in range(1, 40):
                writer.publish(run_id="r", version=v, params=_params(float(v)), config={}, progress={},
                               chunk_bytes=65536)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=publish_many)
    thread.start()
    reads = 0
    seen: set[int] = set()
    while not done.is_set() or reads < 5:
        try:
            snap = reader.read_latest()
        except SnapshotMissing:
            continue
        values = {float(t.float().unique().item()) for t in snap.params.values()}
        assert values == {float(snap.version)}, f"mixed snapshot at version {snap.version}: {values}"
        seen.add(snap.version)
        reads += 1
    thread.join()
    assert not errors
    assert len(seen) >= 2  # the reader really raced several versions
    assert reader.read_latest().version == 39
