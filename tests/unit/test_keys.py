"""Run names and the Redis/AMQP names derived from them."""

from __future__ import annotations

import fnmatch

import pytest

from shared.errors import ConfigError
from shared.keys import RunKeys, validate_run_name


@pytest.mark.parametrize("name", ["default", "exp-1.a", "A_b", "7", "x" * 64])
def test_valid_run_names(name: str) -> None:
    assert validate_run_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a b", "../x", "x" * 65, "-lead", ".hidden", "a:b", "a/b", "abc\n", "é"]
)
def test_invalid_run_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid run name"):
        validate_run_name(name)


def test_run_keys_refuses_bad_names() -> None:
    with pytest.raises(ConfigError):
        RunKeys("a b")


def test_run_keys_layout() -> None:
    keys = RunKeys("exp-1")
    assert keys.manifest(3) == "asyncloco:exp-1:snapshot:{exp-1:v3}:manifest"
    assert keys.chunk(3, 0) == "asyncloco:exp-1:snapshot:{exp-1:v3}:chunk:0"
    assert keys.legacy_snapshot(3, "chunk:0") == "asyncloco:exp-1:snapshot:3:chunk:0"
    assert keys.current == "asyncloco:exp-1:current"
    assert keys.plan == "asyncloco:exp-1:plan"
    assert keys.status == "asyncloco:exp-1:status"
    assert keys.coordinator_lease == "asyncloco:exp-1:coordinator"
    assert keys.delta_queue == "asyncloco.exp-1.deltas"
    assert keys.dead_letter_exchange == "asyncloco.exp-1.dlx"
    assert keys.dead_letter_queue == "asyncloco.exp-1.deltas.dead"
    # every Redis key of one run shares the prefix, and no two runs share one
    assert all(k.startswith(keys.prefix) for k in (keys.current, keys.plan, keys.manifest(0)))
    assert not RunKeys("exp-10").current.startswith(keys.prefix)
    # the volunteers' ACL pattern (coordinator/broker_admin.py) covers every snapshot key, in
    # either layout, and no other run's (Redis globs treat braces as plain characters)
    assert keys.snapshot_pattern == "asyncloco:exp-1:snapshot:*"
    snapshot_keys = (keys.manifest(12), keys.chunk(12, 99), keys.legacy_snapshot(12, "chunk:0"))
    assert all(fnmatch.fnmatchcase(k, keys.snapshot_pattern) for k in snapshot_keys)
    assert not fnmatch.fnmatchcase(RunKeys("exp-10").chunk(12, 0), keys.snapshot_pattern)


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), the checksum Redis Cluster uses."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """Redis Cluster's slot of ``key`` (cluster spec): CRC16 of the hash tag, the part between the
    first ``{`` and the next ``}`` when that part is not empty, else of the whole key; mod 16384."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16_xmodem(raw) % 16384


def test_the_slot_function_is_redis_clusters() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the cluster spec's test vector
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384  # an empty tag hashes the key
    redis_crc = pytest.importorskip("redis.crc")
    for key in ("asyncloco:exp-1:current", "a{b}c", "foo{}{bar}", "{user1000}.following"):
        assert key_slot(key) == redis_crc.key_slot(key.encode())


@pytest.mark.parametrize("run", ["exp-1", "default", "x" * 64, "A_b.c-7"])
def test_every_key_of_one_snapshot_version_is_in_one_cluster_slot(run: str) -> None:
    keys = RunKeys(run)
    for version in (0, 1, 12, 10**9):
        slots = {key_slot(keys.manifest(version))} | {key_slot(keys.chunk(version, i)) for i in range(2000)}
        assert slots == {key_slot(f"{run}:v{version}")}, (run, version)
    # different versions are spread over the cluster (not all on one node), and the layout before
    # the tag put one version's keys in many slots (an MGET of them failed with CROSSSLOT)
    assert len({key_slot(keys.manifest(v)) for v in range(100)}) > 90
    assert len({key_slot(keys.legacy_snapshot(12, f"chunk:{i}")) for i in range(16)}) > 1


def test_each_client_sends_to_one_of_the_runs_delta_queues_always_the_same() -> None:
    keys = RunKeys("exp-1")
    assert keys.delta_queues(1) == [keys.delta_queue]
    assert keys.delta_queues(3) == [keys.delta_queue, f"{keys.delta_queue}.q1", f"{keys.delta_queue}.q2"]
    assert keys.delta_queue_for("alice", 1) == keys.delta_queue
    clients = [f"volunteer-{i}" for i in range(300)]
    chosen = [keys.delta_queue_for(c, 4) for c in clients]
    assert chosen == [RunKeys("exp-1").delta_queue_for(c, 4) for c in clients]  # stable
    counts = {q: chosen.count(q) for q in keys.delta_queues(4)}
    assert set(counts) == set(keys.delta_queues(4)) and min(counts.values()) > 40, counts  # spread
