"""Snapshot patches on the real Redis: a client a few versions behind downloads the patches, a few
bits a parameter, instead of the fp32 snapshot, and reads it whole whenever a patch is missing, not
the coordinator's, or does not chain from what it holds; patches go with their version."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import redis
import torch

from client.config import ClientConfig
from client.fetcher import SnapshotFetcher
from client.replica import Replica
from client.report import RoundReport
from client.worker import Worker
from coordinator.config import CommitConfig
from coordinator.patches import PatchMaker
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy
from shared.signing import SigningKey, seal
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import SnapshotManifest
from shared.snapshot_patch import read_patch_manifest, write_patch
from shared.tasks import load_task
from tests.services import SMALL_TASK, serving, small_config

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5)


class Publishing:
    """What the coordinator's publisher does for each version, on a model that moves at random."""

    def __init__(self, client: redis.Redis, keys: RunKeys, *, keep_versions: int = 3) -> None:
        self.key = SigningKey.generate()
        self.store = SnapshotStore(client, keys, keep_versions=keep_versions, signer=self.key)
        self.maker = PatchMaker("int4")
        task = load_task("bytelm", SMALL_TASK)
        torch.manual_seed(0)
        self.theta = {n: p.detach().clone() for n, p in task.build_model().named_parameters()}
        self.run_id = f"rid-{uuid.uuid4().hex[:12]}"
        self.config = {"task": "bytelm", "task_settings": task.settings_dict(), "inner": {}, "seed": 0}
        self.version = -1
        self.created_at = 1000.0

    def next(self) -> SnapshotManifest:
        if self.version >= 0:
            for t in self.theta.values():
                t.add_(0.01 * torch.randn_like(t))
        self.version += 1
        self.created_at += 1.0
        made = self.maker.patch(run=self.store.keys.run, run_id=self.run_id, version=self.version,
                                created_at=self.created_at, params=self.theta)
        if made is not None:
            write_patch(self.store, *made)
        manifest = self.store.publish(run_id=self.run_id, version=self.version, params=self.theta,
                                      config=self.config, progress={}, created_at=self.created_at)
        self.maker.published(self.version, self.created_at)
        return manifest


def reader(client: redis.Redis, keys: RunKeys, key: SigningKey) -> tuple[SnapshotFetcher, Replica]:
    fetcher = SnapshotFetcher(client, keys, retry=FAST_RETRY, should_stop=lambda: False,
                              verify_key=key.verify_key)
    return fetcher, Replica(client_id="reader", device=torch.device("cpu"), data=None)


def catch_up(fetcher: SnapshotFetcher, replica: Replica, target: SnapshotManifest) -> int | None:
    """What the worker does: patch θ_base to ``target``; the patch bytes read, None if it could not."""
    return replica.catch_up(fetcher, target.version) or None


def base_error(replica: Replica, theta: dict[str, torch.Tensor]) -> float:
    assert replica.trainer is not None
    return max(float((replica.trainer.base[n] - t).abs().max()) for n, t in theta.items())


def test_a_client_two_versions_behind_downloads_the_patches_and_lands_next_to_theta(
    run_name: str, redis_client: redis.Redis
) -> None:
    keys = RunKeys(run_name)
    run = Publishing(redis_client, keys)
    run.next()
    fetcher, replica = reader(redis_client, keys, run.key)
    snapshot = fetcher.read_latest()
    replica.adopt(snapshot)
    full = snapshot.manifest.total_bytes
    for behind in (1, 2, 1, 2, 2):
        for _ in range(behind):
            target = run.next()
        read = catch_up(fetcher, replica, target)
        assert read is not None and read <= 0.14 * behind * full, (read, full)
        assert replica.version == target.version and replica.holds(target.version, fetcher.manifest)
        # within one int4 residual of the version step: absmax/15, absmax of a block of 0.01·N(0,1)
        # steps (and the residual carried) ≤ 0.06 over this many blocks
        assert base_error(replica, run.theta) < 0.06 / 15
        assert replica.trainer is not None
        model = dict(replica.trainer.model.named_parameters())
        assert all(torch.equal(model[n].detach(), replica.trainer.base[n]) for n in model)  # reset to it


def test_missing_forged_or_unchained_patches_mean_a_whole_read(
    run_name: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    keys = RunKeys(run_name)
    run = Publishing(redis_client, keys, keep_versions=5)
    run.next()
    fetcher, replica = reader(redis_client, keys, run.key)
    replica.adopt(fetcher.read_latest())
    before = {n: t.clone() for n, t in replica.trainer.base.items()} if replica.trainer else {}

    run.next()
    target = run.next()  # version 2; the reader holds 0
    redis_client.delete(keys.patch_manifest(1))  # a patch gone: no path from 0 to 2
    assert catch_up(fetcher, replica, target) is None

    caplog.set_level(logging.WARNING, logger="client.fetcher")
    target = run.next()  # version 3, patched from 2 (its patch is there) but 1 is still missing
    assert catch_up(fetcher, replica, target) is None
    replica.adopt(fetcher.read_latest())  # what the worker does then: the whole snapshot
    held = replica.version
    target = run.next()
    genuine = redis_client.get(keys.patch_manifest(target.version))
    assert genuine is not None
    forged = read_patch_manifest(SnapshotStore(redis_client, keys), target.version)
    redis_client.set(keys.patch_manifest(target.version), seal(forged.encode(), SigningKey.generate()))
    assert catch_up(fetcher, replica, target) is None
    assert catch_up(fetcher, replica, target) is None
    refusals = [r for r in caplog.records if "not signed by this run's coordinator" in r.getMessage()]
    assert len(refusals) == 1  # warned once
    assert replica.version == held  # θ_base untouched by what failed

    redis_client.set(keys.patch_manifest(target.version), genuine)
    assert catch_up(fetcher, replica, target) is not None  # the genuine patch is back: it is used
    # Redis lost the version the reader holds and the coordinator wrote it again (a new stamp): the
    # next patch starts from that publish, not from the one the reader read
    run.created_at += 1.0
    run.store.publish(run_id=run.run_id, version=run.version, params=run.theta, config=run.config,
                      progress={}, created_at=run.created_at, republish=True)
    run.maker.published(run.version, run.created_at)
    assert catch_up(fetcher, replica, run.next()) is None
    assert before  # the reader had a model all along


def test_patches_are_dropped_with_their_version(run_name: str, redis_client: redis.Redis) -> None:
    keys = RunKeys(run_name)
    run = Publishing(redis_client, keys, keep_versions=2)
    for _ in range(4):
        run.next()
    assert redis_client.exists(keys.patch_manifest(3), keys.patch_chunk(3, 0)) == 2
    assert redis_client.exists(keys.patch_manifest(2)) == 1
    assert redis_client.exists(keys.patch_manifest(1), keys.patch_chunk(1, 0)) == 0
    assert not redis_client.keys(f"{keys.prefix}snapshot:{{{keys.run}:v1}}*")


@pytest.mark.parametrize("patches", ["int4", "none"])
def test_a_real_client_of_a_real_coordinator_reads_patches_after_its_first_snapshot(
    patches: str, run_name: str, tmp_path: Path
) -> None:
    config = small_config(run_name, tmp_path, commit=CommitConfig(every_updates=1, interval_s=0.3,
                                                                  patch_codec=patches))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        client = ClientConfig(run=run_name,
                              connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
                              device="cpu", state_dir=tmp_path / "client", threads=1, max_rounds=5,
                              retry=FAST_RETRY, poll_s=0.2, include_wait_s=10.0,
                              coordinator_key=coordinator.signing_key.public_hex)
        with Worker(client) as worker:
            worker.run(on_round=reports.append)
        full = sum(t.numel() * 4 for t in coordinator.run.optimizer.params.values())
    assert len(reports) == 5
    first, later = reports[0].received_bytes, [r.received_bytes for r in reports[1:]]
    assert first == full and all(later), later  # each round starts from the version with its last delta
    if patches == "none":
        assert later == [first] * 4
    else:
        assert all(b < 0.15 * first for b in later), (first, later)


def test_a_base_that_overlap_stacked_a_delta_on_is_unstacked_then_patched(
    run_name: str, redis_client: redis.Redis
) -> None:
    """--overlap stacks the client's in-flight delta on θ_base; the patches are made for the
    snapshot's θ̂, so that delta comes off before they go on: the base lands on θ̂ itself."""
    keys = RunKeys(run_name)
    run = Publishing(redis_client, keys)
    run.next()
    fetcher, replica = reader(redis_client, keys, run.key)
    replica.adopt(fetcher.read_latest())
    trainer = replica.trainer
    assert trainer is not None
    own = {n: torch.full_like(b, 0.3) for n, b in trainer.base.items()}
    trainer.stack_on_base(own, 0.45)
    target = run.next()
    assert catch_up(fetcher, replica, target) is not None
    assert trainer.stacked == []
    # equal to the coordinator's θ̂ but for the float rounding of taking 0.135 off and on again
    gap = max(float((trainer.base[n] - s).abs().max()) for n, s in run.maker.served.items())
    assert gap < 1e-6, gap
