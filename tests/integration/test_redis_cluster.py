"""A Redis Cluster of three nodes on loopback ports (docs/SCALING.md): the coordinator and a real
client on ``redis+cluster://`` train as on one Redis, snapshot versions spread over the nodes, a
volunteer's user reads from every node, and ``delete-run`` finds the run's keys on all of them.
The nodes are private ``redis-server`` processes (:class:`tests.private_redis.PrivateRedisCluster`),
stopped by their pids whatever happens; RabbitMQ is the shared one."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch

from client.config import ClientConfig
from client.fetcher import SnapshotFetcher
from client.report import RoundReport
from client.worker import Worker
from coordinator.broker_admin import create_redis_user, delete_redis_user
from coordinator.config import CommitConfig
from coordinator.run_admin import delete_run_keys
from harness.processes import AMQP_URL, wait_for
from shared.keys import RunKeys
from shared.settings import REDIS_ERRORS, ConnectionSettings, RetryPolicy, connect_redis
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from tests.private_broker import free_port
from tests.private_redis import PrivateRedisCluster
from tests.services import serving, small_config

pytestmark = pytest.mark.integration
FAST_RETRY = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5, give_up_after_s=30.0)


@pytest.fixture
def cluster(tmp_path: Path) -> PrivateRedisCluster:
    with PrivateRedisCluster(tmp_path / "cluster") as running:
        yield running


def test_a_coordinator_and_a_client_train_on_a_three_node_cluster(
    cluster: PrivateRedisCluster, run_name: str, tmp_path: Path
) -> None:
    servers = ConnectionSettings(redis_url=cluster.url, amqp_url=AMQP_URL)
    keys = RunKeys(run_name)
    config = small_config(run_name, tmp_path, connection=servers,
                          commit=CommitConfig(every_updates=1, interval_s=0.3, keep_versions=6))
    reports: list[RoundReport] = []
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        client = ClientConfig(run=run_name, connection=servers, device="cpu", state_dir=tmp_path / "client",
                              threads=1, max_rounds=5, retry=FAST_RETRY, poll_s=0.2, include_wait_s=10.0,
                              coordinator_key=coordinator.signing_key.public_hex)
        with Worker(client) as worker:
            summary = worker.run(on_round=reports.append)
        wait_for(lambda: coordinator.publisher.published_version >= 5, what="every delta in a snapshot")
        newest = coordinator.publisher.published_version
    assert summary.rounds == 5 and all(r.fate.verdict and r.fate.verdict.applied for r in reports), \
        [r.line() for r in reports]
    # every round after the first started from a newer version, read by patches
    assert all(0 < r.received_bytes < reports[0].received_bytes for r in reports[1:])
    # the kept versions (each with its chunks and patch in one slot) lie on more than one node
    kept = [v for v in range(newest + 1) if cluster.keys(keys.manifest(v))]
    assert len(kept) >= 3 and len({cluster.node_of(keys.manifest(v)) for v in kept}) >= 2, kept
    for v in kept:
        node = cluster.node_of(keys.manifest(v))
        assert cluster.node_of(keys.chunk(v, 0)) == cluster.node_of(keys.patch_manifest(v)) == node

    admin = connect_redis(servers)
    try:
        assert delete_run_keys(admin, keys) > 0  # SCAN on every node, DEL split by slot
    finally:
        admin.close()
    assert cluster.keys(f"{keys.prefix}*") == []


def test_a_volunteers_read_only_user_reads_snapshots_on_every_node(
    cluster: PrivateRedisCluster, run_name: str
) -> None:
    keys = RunKeys(run_name)
    key = SigningKey.generate()
    admin = connect_redis(ConnectionSettings(redis_url=cluster.url, amqp_url=AMQP_URL))
    try:
        create_redis_user(admin, "vol-alice", keys, "s3cret")  # on every node: each keeps its own users
        store = SnapshotStore(admin, keys, keep_versions=3, signer=key)
        for v in range(4):  # versions in different slots, so on different nodes
            store.publish(run_id="r", version=v, params={"w": torch.full((1000,), float(v))},
                          config={}, progress={})
        volunteer_url = cluster.url.replace("redis+cluster://", "redis+cluster://vol-alice:s3cret@")
        reader = connect_redis(ConnectionSettings(redis_url=volunteer_url, amqp_url=AMQP_URL))
        try:
            fetcher = SnapshotFetcher(reader, keys, retry=FAST_RETRY, should_stop=lambda: False,
                                      verify_key=key.verify_key)
            assert fetcher.read_latest().version == 3
            for v in (1, 2, 3):
                assert torch.all(store.read(v).params["w"] == float(v))
                assert fetcher.manifest(v).version == v
            with pytest.raises(redis.exceptions.NoPermissionError):
                reader.set(keys.current, b"0")  # read-only, whichever node the key is on
        finally:
            reader.close()
        assert delete_redis_user(admin, "vol-alice")
    finally:
        admin.close()


def test_a_cluster_that_does_not_answer_is_an_outage_not_a_crash() -> None:
    client = connect_redis(ConnectionSettings(redis_url=f"redis+cluster://127.0.0.1:{free_port()}/0",
                                              amqp_url=AMQP_URL, socket_timeout_s=1.0))
    try:  # made without contacting anyone, like a plain client
        with pytest.raises(REDIS_ERRORS):
            client.get("anything")
    finally:
        client.close()
