"""Snapshots in the real Redis: publish/read, expiry of old versions, a reader racing a publisher."""

from __future__ import annotations

import threading
import tracemalloc

import pytest
import redis
import torch

from shared.errors import SnapshotError, SnapshotMissing, SnapshotOtherProtocol
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


def test_pointer_never_moves_backwards_and_old_versions_go_at_once(
    redis_client: redis.Redis, run_name: str
) -> None:
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys, keep_versions=2, signer=KEY)
    for v in range(6):
        manifest = store.publish(run_id="r", version=v, params=_params(float(v)), config={}, progress={},
                                 chunk_bytes=65536)
        # only the newest keep_versions are left, manifest and every chunk, none with an expiry
        for old in range(v + 1):
            there = [redis_client.exists(keys.manifest(old))] + [
                redis_client.exists(keys.chunk(old, i)) for i in range(len(manifest.chunk_sha256))]
            assert set(there) == ({1} if old > v - 2 else {0}), (v, old)
            if old > v - 2:
                assert redis_client.ttl(keys.chunk(old, 0)) == -1
    assert store.current_version() == 5
    with pytest.raises(SnapshotError, match="already points"):
        store.publish(run_id="r", version=4, params=_params(9.0, 1000), config={}, progress={})
    assert store.current_version() == 5


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_redis_never_holds_more_than_keep_versions_and_readers_always_have_one(
    redis_client: redis.Redis, run_name: str, keep: int
) -> None:
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys, keep_versions=keep, signer=KEY, verify_key=KEY.verify_key)

    def held() -> set[int]:
        return {v for v in range(8) if redis_client.exists(keys.manifest(v), keys.chunk(v, 0)) == 2}

    def readable() -> int:
        try:
            return store.read().version
        except SnapshotMissing:
            return -1

    during: list[tuple[set[int], int]] = []
    for v in range(8):
        store.publish(run_id="r", version=v, params=_params(float(v), 1000), config={}, progress={},
                      before_flip=lambda: during.append((held(), readable())))
        assert held() == set(range(max(0, v - keep + 1), v + 1))
    for v, (keys_held, read_version) in enumerate(during):
        # while v is written: the version readers are on (v - 1) is whole, and with v at most
        # max(keep, 2) versions are in Redis (keep 1: v - 1 goes only after the flip)
        assert read_version == v - 1 and len(keys_held) <= max(keep, 2)
        assert v in keys_held and (v == 0 or v - 1 in keys_held)


def test_a_grace_keeps_pushed_out_versions_a_while(redis_client: redis.Redis, run_name: str) -> None:
    keys = RunKeys(run_name)
    store = SnapshotStore(redis_client, keys, keep_versions=2, expire_grace_s=30, signer=KEY)
    for v in range(4):
        store.publish(run_id="r", version=v, params=_params(float(v), 1000), config={}, progress={})
    assert 0 < redis_client.ttl(keys.manifest(1)) <= 30  # 3 - keep_versions
    assert 0 < redis_client.ttl(keys.chunk(1, 0)) <= 30
    assert redis_client.ttl(keys.manifest(2)) == -1  # kept without expiry


def test_publishing_makes_no_copy_of_the_model(redis_client: redis.Redis, run_name: str) -> None:
    # 12 MB of float32 in 1 MiB chunks. Before, the flat bytes and the list of chunks were both
    # Python bytes (24 MB seen by tracemalloc); now only a chunk that spans two tensors is joined.
    params = {f"w{i}": torch.full((1_000_000,), float(i)) for i in range(3)}
    store = SnapshotStore(redis_client, RunKeys(run_name), signer=KEY, verify_key=KEY.verify_key)
    store.publish(run_id="r", version=0, params=params, config={}, progress={}, chunk_bytes=2**20)
    tracemalloc.start()
    try:
        store.publish(run_id="r", version=1, params=params, config={}, progress={}, chunk_bytes=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak} bytes allocated while publishing a 12 MB snapshot"
    snap = store.read()
    assert snap.version == 1 and all(torch.equal(snap.params[k], v) for k, v in params.items())


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


class _KeysBeforeHashTags(RunKeys):
    """The key layout of a coordinator from before hash tags (``snapshot:V:manifest``)."""

    def snapshot_key(self, version: int, item: str) -> str:
        return self.legacy_snapshot(version, item)


def test_an_upgraded_coordinator_serves_readers_and_deletes_the_old_layouts_versions(
    redis_client: redis.Redis, run_name: str
) -> None:
    keys = RunKeys(run_name)
    old = SnapshotStore(redis_client, _KeysBeforeHashTags(run_name), keep_versions=3, signer=KEY)
    for v in range(3):  # what Redis holds when the old coordinator stops: versions 0-2, current 2
        old.publish(run_id="r", version=v, params=_params(float(v), 1000), config={}, progress={})
    legacy = f"{keys.prefix}snapshot:[0-9]*"
    assert len(list(redis_client.scan_iter(match=legacy))) == 3 * 2  # a manifest and a chunk each
    reader = SnapshotStore(redis_client, keys, verify_key=KEY.verify_key)
    # an upgraded reader sees the old layout's protocol: its fetcher waits run_wait_s for an
    # upgraded coordinator, then says which side to upgrade (ProtocolMismatch)
    with pytest.raises(SnapshotOtherProtocol) as refused:
        reader.read()
    assert refused.value.theirs == 2
    new = SnapshotStore(redis_client, keys, keep_versions=3, signer=KEY)
    for v in range(3, 6):  # the upgraded coordinator starts at current + 1
        new.publish(run_id="r", version=v, params=_params(float(v), 1000), config={}, progress={})
        assert reader.read().version == v
        # each publish deletes the version pushed out of the kept three, in either layout
        assert {int(k.split(b":")[3]) for k in redis_client.scan_iter(match=legacy)} == set(range(v - 2, 3))
    assert list(redis_client.scan_iter(match=legacy)) == []
