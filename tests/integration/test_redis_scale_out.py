"""Past one Redis (docs/SCALING.md), on this machine: a client reading snapshots from a read-only
replica, and the snapshot store on a Redis Cluster node, each on private ``redis-server`` processes
on loopback ports, stopped by their pids whatever happens (:class:`tests.private_redis.PrivateRedis`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from client.credentials import snapshot_source
from client.fetcher import SnapshotFetcher
from coordinator.broker_admin import create_redis_user
from harness.processes import AMQP_URL, wait_for
from shared.contact import ServerContact
from shared.errors import AccessRefused, NoSuchRun, SnapshotMissing
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy, connect_redis
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from tests.private_broker import free_port
from tests.private_redis import PrivateRedis
from tests.services import serving, small_config

pytestmark = pytest.mark.integration
FAST_RETRY = RetryPolicy(initial_delay_s=0.05, max_delay_s=0.2, give_up_after_s=30.0)
KEY = SigningKey.generate()  # a stand-in coordinator's, for the tests without a coordinator


def _caught_up(primary: PrivateRedis, replica: PrivateRedis, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until ``replica`` has applied everything ``primary`` had written so far."""
    written = int(primary.replication()["master_repl_offset"])
    wait_for(lambda: replica.replication().get("master_link_status") == "up"
             and int(replica.replication()["slave_repl_offset"]) >= written,
             timeout_s, "the replica to catch up with its primary")


def _fetcher(client: redis.Redis, run: str, key: SigningKey, url: str,
             run_wait_s: float = 30.0) -> SnapshotFetcher:
    return SnapshotFetcher(client, RunKeys(run), retry=FAST_RETRY, should_stop=lambda: False,
                           verify_key=key.verify_key, poll_s=0.05,
                           contact=ServerContact(url, option="--snapshot-url"), run_wait_s=run_wait_s)


def test_a_client_fetches_the_coordinators_snapshot_from_a_read_only_replica(
    tmp_path: Path, run_name: str
) -> None:
    keys = RunKeys(run_name)
    with (PrivateRedis(tmp_path / "primary") as primary,
          PrivateRedis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)) as replica):
        config = small_config(run_name, tmp_path,
                              connection=ConnectionSettings(redis_url=primary.url, amqp_url=AMQP_URL))
        with serving(config) as coordinator:  # publishes its first snapshot to the primary
            with primary.client() as on_primary:
                version = int(wait_for(lambda: on_primary.get(keys.current), 60, "the first snapshot"))
                create_redis_user(on_primary, "vol-alice", keys, "pw")  # as `invite` does
            _caught_up(primary, replica)
            with replica.client() as admin:
                assert admin.info("replication")["role"] == "slave"
                with pytest.raises(redis.exceptions.ReadOnlyError):
                    admin.set(keys.current, b"999")  # nobody writes through a replica
            # `join --snapshot-url redis://REPLICA` with a token for the primary: the token's user
            url = snapshot_source(f"redis://127.0.0.1:{replica.port}",
                                  f"redis://vol-alice:pw@127.0.0.1:{primary.port}/0")
            assert url == f"redis://vol-alice:pw@127.0.0.1:{replica.port}/0"
            reader = connect_redis(ConnectionSettings(redis_url=url))
            try:
                fetcher = _fetcher(reader, run_name, coordinator.signing_key, url)
                # ACL users are not replicated: the replica does not know the volunteer yet ...
                with pytest.raises(AccessRefused, match="vol-alice"):
                    fetcher.ping()
                with replica.client() as admin:
                    create_redis_user(admin, "vol-alice", keys, "pw")  # ... until made there too
                assert fetcher.wait_for_version(0.05) == version
                snapshot = fetcher.read_latest()  # verified against the coordinator's key
                plan = fetcher.plan()
            finally:
                reader.close()
            assert snapshot.version == version and snapshot.manifest.run_id == coordinator.run.run_id
            theta = coordinator.run.optimizer.params
            assert snapshot.params.keys() == theta.keys()
            assert all(torch.equal(snapshot.params[name], theta[name].cpu()) for name in theta)
            assert plan is not None  # the signed round plan comes from the replica too


def test_reads_from_a_replica_racing_the_publisher_are_always_whole_and_never_go_back(
    tmp_path: Path, run_name: str
) -> None:
    """``current`` and the chunks it names come from the same replica: the replication stream
    brings a version's chunks and manifest before the flip, so no read is torn, mixed or older."""
    keys = RunKeys(run_name)
    with (PrivateRedis(tmp_path / "primary") as primary,
          PrivateRedis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)) as replica):
        writer, reader = primary.client(), replica.client()
        try:
            store = SnapshotStore(writer, keys, keep_versions=2, signer=KEY)
            done, read_once = threading.Event(), threading.Event()

            def publish() -> None:
                try:
                    for v in range(40):
                        if v == 1:
                            read_once.wait(30)  # the reader is on version 0: the rest race its reads
                        params = {"w": torch.full((500_000,), float(v)), "b": torch.full((3,), float(v))}
                        store.publish(run_id="r", version=v, params=params, config={}, progress={},
                                      chunk_bytes=64 * 1024)
                        time.sleep(0.02)  # readers get to read some versions, not only the last
                finally:
                    done.set()

            publisher = threading.Thread(target=publish, daemon=True)
            publisher.start()
            fetcher = _fetcher(reader, run_name, KEY, replica.url)
            seen: list[int] = []
            deadline = time.monotonic() + 120
            while not seen or seen[-1] < 39:
                assert time.monotonic() < deadline, f"read only versions {seen}"
                if done.is_set():
                    _caught_up(primary, replica)
                if fetcher.current_version() is None:
                    time.sleep(0.01)
                    continue
                snapshot = fetcher.read_latest()  # sha256 of every chunk checked against the manifest
                v = snapshot.version
                assert all(torch.all(t == float(v)) for t in snapshot.params.values()), v  # not mixed
                seen.append(v)
                read_once.set()
            publisher.join(timeout=30)
        finally:
            writer.close()
            reader.close()
    assert seen[0] == 0 and seen[-1] == 39 and seen == sorted(seen), seen


def test_a_replica_cut_off_from_its_primary_is_waited_out_not_a_config_error(
    tmp_path: Path, run_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With replica-serve-stale-data off, a replica that lost its primary answers MASTERDOWN; the
    client waits, as for any outage, and reads once the link is back."""
    keys = RunKeys(run_name)
    nowhere = free_port()  # nothing listens there: the replica's primary is down
    with (PrivateRedis(tmp_path / "primary") as primary,
          PrivateRedis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(nowhere),
                       "--replica-serve-stale-data", "no") as replica):
        with primary.client() as writer:
            SnapshotStore(writer, keys, signer=KEY).publish(run_id="r", version=3, config={}, progress={},
                                                            params={"w": torch.ones(10)})
        reader = replica.client()
        try:
            with pytest.raises(redis.exceptions.MasterDownError):
                reader.get(keys.current)
            fetcher = _fetcher(reader, run_name, KEY, replica.url)
            found: list[int | None] = []
            with caplog.at_level(logging.WARNING, logger="client.fetcher"):
                waiting = threading.Thread(target=lambda: found.append(fetcher.current_version()),
                                           daemon=True)
                waiting.start()
                wait_for(lambda: "Redis unavailable while reading the snapshot version" in caplog.text, 20,
                         "the client to wait out MASTERDOWN")
                assert waiting.is_alive() and not found
                with replica.client() as admin:
                    admin.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
                waiting.join(timeout=30)
            assert found == [3]
            assert "Redis is back" in caplog.text
            assert fetcher.read_latest().version == 3
        finally:
            reader.close()


def test_the_snapshot_store_works_on_a_redis_cluster_node(tmp_path: Path, run_name: str) -> None:
    """A one-node Redis Cluster (every slot on this node) still refuses a multi-key command across
    slots (CROSSSLOT): a version's chunks are read with MGET and deleted with DEL in one slot."""
    keys = RunKeys(run_name)
    root = tmp_path / "cluster"
    # its own bus port: the default, port + 10000, is past 65535 for half of the free ports
    with PrivateRedis(root, "--cluster-enabled", "yes", "--cluster-config-file", str(root / "nodes.conf"),
                      "--cluster-port", str(free_port())) as node:
        client = node.client()
        try:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            wait_for(lambda: client.cluster("info")["cluster_state"] == "ok", 20, "the cluster to be ok")
            with pytest.raises(redis.exceptions.ClusterCrossSlotError):  # the server's CROSSSLOT
                client.mget([keys.legacy_snapshot(1, f"chunk:{i}") for i in range(16)])  # the old layout
            # A client looking for a run not there yet: one EXISTS per key, each in its own slot.
            with pytest.raises(NoSuchRun):
                _fetcher(client, run_name, KEY, node.url, run_wait_s=0.1).wait_for_version(0.05)
            store = SnapshotStore(client, keys, keep_versions=2, signer=KEY, verify_key=KEY.verify_key)
            for v in range(5):
                manifest = store.publish(run_id="r", version=v, config={}, progress={}, chunk_bytes=16 * 1024,
                                         params={"w": torch.full((100_000,), float(v))})
                snapshot = _fetcher(client, run_name, KEY, node.url).read_latest()  # MGETs of 16 chunks
                assert snapshot.version == v and torch.all(snapshot.params["w"] == float(v))
            assert len(manifest.chunk_sha256) == 25
            # the versions pushed out were deleted (one DEL per batch of one version's keys)
            assert [v for v in range(5) if client.exists(keys.manifest(v), keys.chunk(v, 0))] == [3, 4]
            with pytest.raises(SnapshotMissing):
                store.read(2)
        finally:
            client.close()
