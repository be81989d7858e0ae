"""Signed snapshots and plans on the real servers: what a client does with what its coordinator did
not sign.

Whoever can write Redis can put anything under the run's keys. A client pins the coordinator's
public key, so a manifest that is unsigned, signed by another key, or signed but replayed under
another version's key is reported once and never used: the client runs nothing, imports nothing,
and keeps waiting until the genuine snapshot is back, then trains on it. The forged manifests
below name tasks the client *has* allowed, so that only the signature stands in the way; the
allow-list has its own test, with a manifest the coordinator really signed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import redis
import torch

from client.config import ClientConfig
from client.fetcher import SnapshotFetcher
from client.report import RoundReport
from client.stop import StopRequested
from client.worker import Worker
from coordinator.config import CommitConfig, CoordinatorConfig
from coordinator.consumer import QueueConfig, declare_queues
from coordinator.identity import AuthMode
from coordinator.registry import PlanConfig
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, Processes, wait_for
from shared.errors import ConfigError
from shared.keys import RunKeys
from shared.round_plan import RoundPlan
from shared.settings import ConnectionSettings, RetryPolicy, connect_redis
from shared.signing import SigningKey, seal
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import SnapshotManifest
from shared.tasks import load_task
from tests.services import SMALL_TASK, serving

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5)
REFUSAL = "refusing it"  # in every warning about a manifest that is not the coordinator's
OTHER = SigningKey.generate()  # an attacker's key


def write_probe(directory: Path, marker: Path) -> str:
    """A real task module whose import leaves ``marker``: the name of a task that would be imported."""
    name = f"probe_{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from shared.tasks.bytelm import make_bytelm as make\n"
    )
    return name


def client_config(run: str, state_dir: Path, key: SigningKey, **overrides: Any) -> ClientConfig:
    settings: dict[str, Any] = dict(
        run=run, connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL), device="cpu",
        state_dir=state_dir, threads=1, max_rounds=1, retry=FAST_RETRY, poll_s=0.2, include_wait_s=0.0,
        coordinator_key=key.public_hex)
    settings.update(overrides)
    return ClientConfig(**settings)


# --- forged manifests against a real coordinator and a real client process -------------------------


@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    config = CoordinatorConfig(
        auth=AuthMode.OPEN, run=run_name, task_settings=SMALL_TASK,
        plan=PlanConfig(local_steps=3, min_local_steps=1),
        commit=CommitConfig(every_updates=1, interval_s=0.3),
        connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
        checkpoint_dir=tmp_path / "ckpt", max_seconds=240,
    )
    with serving(config, signing_key=SigningKey.load_or_create(tmp_path / "signing.key")) as coord:
        wait_for(lambda: coord.publisher.published_version >= 0, what="the first snapshot")
        yield coord


def _forge(forgery: str, client: redis.Redis, keys: RunKeys, version: int, genuine: bytes,
           task: str, task_settings: dict[str, Any]) -> bytes:
    """What an attacker with write access to Redis puts under ``keys.manifest(version)``."""
    if forgery == "replay":  # the coordinator's own signed manifest of the version before
        older = client.get(keys.manifest(version - 1))
        assert older is not None
        return older
    real = SnapshotStore(client, keys).read_manifest(version)  # unwrapped, not verified
    # The real chunk hashes: were the signature not checked, every other check would pass.
    config = {**real.config, "task": task, "task_settings": task_settings}
    body = SnapshotManifest(run=real.run, run_id=real.run_id, version=version, params=real.params,
                            chunk_bytes=real.chunk_bytes, chunk_sha256=real.chunk_sha256, config=config,
                            progress=real.progress, created_at=real.created_at).encode()
    return body if forgery == "unsigned" else seal(body, OTHER)


@pytest.mark.parametrize("forgery", ["unsigned", "other_key", "replay"])
def test_a_client_refuses_a_forged_manifest_runs_nothing_and_trains_once_it_is_genuine(
    forgery: str, coordinator: Coordinator, procs: Processes, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = coordinator.keys
    key = coordinator.signing_key
    if forgery == "replay":  # an honest round moves the run to version 1, so version 0 can be replayed
        with Worker(client_config(keys.run, tmp_path / "honest", key, include_wait_s=5.0)) as honest:
            assert honest.run().rounds == 1
        wait_for(lambda: coordinator.publisher.published_version >= 1, what="version 1")
    version = int(redis_client.get(keys.current))
    genuine = redis_client.get(keys.manifest(version))
    assert genuine is not None
    ran = tmp_path / "ran"  # `touch`ed by subprocess.run if the forged manifest were used
    imported = tmp_path / "imported"  # left by the probe task's import
    probe = write_probe(tmp_path / "probe", imported)
    task, settings = (("subprocess:run", {"args": ["touch", str(ran)]}) if forgery == "unsigned"
                      else (f"{probe}:make", SMALL_TASK))
    redis_client.set(keys.manifest(version), _forge(forgery, redis_client, keys, version, genuine,
                                                    task, settings))

    procs.env["PYTHONPATH"] = str(tmp_path / "probe")
    victim = procs.start(
        "victim", "-m", "client.cli", "join", "--run", keys.run, "--client-id", "victim", "--threads", "1",
        "--device", "cpu", "--state-dir", str(tmp_path / "victim"), "--max-seconds", "120",
        "--coordinator-key", key.public_hex, "--allow-task", task,  # the volunteer even allowed it
    )
    wait_for(lambda: REFUSAL in procs.log("victim"), 60, "the client's refusal")
    time.sleep(2.0)  # ten polls at least: still refused, still reported only once
    log = procs.log("victim")
    assert log.count(REFUSAL) == 1, log
    assert f"snapshot {version}" in log or f"version {version}" in log
    assert "joined run" not in log and victim.poll() is None, log  # not used, not crashed: waiting
    assert not ran.exists() and not imported.exists()

    redis_client.set(keys.manifest(version), genuine)  # the genuine snapshot is back
    wait_for(lambda: "round 1 " in procs.log("victim"), 90, "a round on the genuine snapshot")
    assert procs.terminate(victim) == 0, procs.log("victim")
    log = procs.log("victim")
    assert f"joined run {keys.run!r}" in log and f"at version {version} " in log
    assert not ran.exists() and not imported.exists() and "Traceback" not in log


# --- forged plans, the allow-list, rollbacks: a stand-in coordinator (no one rewrites its keys) ---


@pytest.fixture
def amqp_channel() -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


def publish_run(store: SnapshotStore, *, task: str = "bytelm", local_steps: int = 2) -> RoundPlan:
    """What a coordinator does at start: a signed snapshot v0 of a fresh model, then a signed plan."""
    bytelm = load_task("bytelm", SMALL_TASK)
    torch.manual_seed(0)
    params = {n: p.detach().clone() for n, p in bytelm.build_model().named_parameters()}
    run_id = f"rid-{uuid.uuid4().hex[:12]}"
    store.publish(run_id=run_id, version=0, params=params,
                  config={"task": task, "task_settings": bytelm.settings_dict(), "inner": {}, "seed": 0},
                  progress={"local_steps": 0, "updates": 0})
    plan = RoundPlan(run_id=run_id, local_steps=local_steps, min_local_steps=1, fastest_steps_per_s=0.0,
                     active_clients=1, updated_at=time.time())
    store.publish_plan(plan)
    return plan


@pytest.mark.parametrize("forgery", ["unsigned", "other_key"])
def test_a_forged_plan_is_refused_once_and_the_genuine_one_sizes_the_round(
    forgery: str, run_name: str, redis_client: redis.Redis, amqp_channel: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = RunKeys(run_name)
    key = SigningKey.generate()
    store = SnapshotStore(redis_client, keys, signer=key)
    genuine = publish_run(store, local_steps=2)
    declare_queues(amqp_channel, keys, QueueConfig())
    forged = RoundPlan(run_id=genuine.run_id, local_steps=500, min_local_steps=500, fastest_steps_per_s=0.0,
                       active_clients=1, updated_at=time.time())
    redis_client.set(keys.plan, forged.encode() if forgery == "unsigned" else seal(forged.encode(), OTHER))
    caplog.set_level(logging.WARNING, logger="client.fetcher")
    reports: list[RoundReport] = []
    failed: list[BaseException] = []

    def train() -> None:
        try:
            with Worker(client_config(run_name, tmp_path, key)) as worker:
                worker.run(on_round=reports.append)
        except BaseException as exc:  # noqa: BLE001 - the test fails on it below
            failed.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "round plan is not signed" in r.getMessage()]

    wait_for(refusals, 60, "the plan's refusal")
    time.sleep(1.5)
    assert len(refusals()) == 1 and not reports and not failed  # waiting, as for a missing plan
    store.publish_plan(genuine)
    thread.join(timeout=60)
    assert not thread.is_alive() and not failed, failed
    (report,) = reports
    assert report.planned_steps == 2 and report.sent  # the genuine plan's H, not the forged 500


def test_a_signed_run_naming_a_task_not_allowed_is_refused_before_import_and_runs_once_allowed(
    run_name: str, redis_client: redis.Redis, amqp_channel: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = RunKeys(run_name)
    key = SigningKey.generate()
    imported = tmp_path / "imported"
    probe = write_probe(tmp_path / "probe", imported)
    monkeypatch.syspath_prepend(str(tmp_path / "probe"))
    publish_run(SnapshotStore(redis_client, keys, signer=key), task=f"{probe}:make")
    declare_queues(amqp_channel, keys, QueueConfig())

    # A real client process: one line, exit 1, nothing imported.
    procs = Processes(tmp_path)
    procs.env["PYTHONPATH"] = str(tmp_path / "probe")
    try:
        refused = procs.start("refused", "-m", "client.cli", "join", "--run", run_name, "--threads", "1",
                              "--device", "cpu", "--state-dir", str(tmp_path / "cli"),
                              "--coordinator-key", key.public_hex, "--max-seconds", "60")
        assert refused.wait(timeout=60) == 1
    finally:
        procs.stop_all()
    error_lines = [line for line in procs.log("refused").splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"--allow-task {probe}:make" in error_lines[0], procs.log("refused")
    assert "Traceback" not in procs.log("refused") and not imported.exists()

    with Worker(client_config(run_name, tmp_path / "a", key)) as worker, \
            pytest.raises(ConfigError, match=f"task '{probe}:make' is not allowed"):
        worker.run()
    assert probe not in sys.modules and not imported.exists()

    with Worker(client_config(run_name, tmp_path / "b", key, allowed_tasks=(f"{probe}:make",))) as worker:
        summary = worker.run()
    assert summary.rounds == 1 and summary.deltas_sent == 1 and imported.exists()


def test_a_pointer_moved_back_within_a_run_is_refused_but_a_new_run_is_taken(
    run_name: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    keys = RunKeys(run_name)
    key = SigningKey.generate()
    store = SnapshotStore(redis_client, keys, signer=key)
    params = {"w": torch.arange(6, dtype=torch.float32)}
    for version in (0, 1):
        store.publish(run_id="run-a", version=version, params={"w": params["w"] + version}, config={},
                      progress={})
    reader = connect_redis(ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL))
    deadline = [0.0]
    fetcher = SnapshotFetcher(reader, keys, retry=FAST_RETRY, verify_key=key.verify_key, poll_s=0.1,
                              should_stop=lambda: time.monotonic() > deadline[0])
    caplog.set_level(logging.WARNING, logger="client.fetcher")
    try:
        deadline[0] = time.monotonic() + 30
        assert fetcher.read_latest().version == 1
        redis_client.set(keys.current, 0)  # signed version 0 is still there: a rollback
        deadline[0] = time.monotonic() + 1.0
        with pytest.raises(StopRequested):  # it waited, and never returned version 0
            fetcher.read_latest()
        warnings = [r.getMessage() for r in caplog.records if r.name == "client.fetcher"]
        assert len(warnings) == 1 and "older than version 1" in warnings[0], warnings
        deadline[0] = time.monotonic() + 30
        redis_client.set(keys.current, 1)
        assert fetcher.read_latest().version == 1
        redis_client.delete(keys.current)  # a coordinator started afresh: another run id, from 0
        store.publish(run_id="run-b", version=0, params=params, config={}, progress={})
        fresh = fetcher.read_latest()
        assert (fresh.manifest.run_id, fresh.version) == ("run-b", 0)
    finally:
        reader.close()
