"""The client against the real Redis and RabbitMQ: it trains rounds and its deltas arrive whole.

Each test plays the coordinator's part itself (snapshot v0 and a round plan in Redis, the delta
queue on RabbitMQ) under a fresh run name; ``run_scope`` removes its keys and queue afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pika
import pika.exceptions
import pytest
import redis
import torch

import client.uploader
from client.config import ClientConfig
from client.report import RoundReport, RunSummary
from client.worker import Worker
from coordinator.consumer import QueueConfig, declare_queues
from harness.processes import AMQP_URL, REDIS_URL
from shared.codecs import get_codec
from shared.delta_parts import PART_TYPE, DeltaPart
from shared.errors import ConfigError
from shared.keys import RunKeys
from shared.protocol import DEFAULT_DELTA_LIMITS, DeltaMessage, MiB
from shared.round_plan import RoundPlan
from shared.settings import ConnectionSettings, RetryPolicy
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import SnapshotManifest
from shared.tasks import load_task
from tests.relay import OutageProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TASK_SETTINGS = {"model_size": "tiny", "batch_size": 4, "eval_sequences": 4, "max_corpus_bytes": 2_000_000}
FAST_RETRY = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5)
SIGNING_KEY = SigningKey.generate()  # the tests' stand-in coordinator signs with it; clients pin it


@pytest.fixture
def keys(run_name: str) -> RunKeys:
    return RunKeys(run_name)  # run_scope (conftest) deletes the run's keys and queues afterwards


@pytest.fixture
def rdb(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def amqp() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


def declare_delta_queue(channel: pika.adapters.blocking_connection.BlockingChannel, keys: RunKeys) -> None:
    """What the coordinator declares: the queue, and the exchange clients publish to."""
    declare_queues(channel, keys, QueueConfig())


def publish_run(
    rdb: redis.Redis, keys: RunKeys, *, local_steps: int = 3, **task_settings: object
) -> SnapshotManifest:
    """Do what the coordinator does at start: snapshot v0 of a fresh model, then the round plan."""
    task = load_task("bytelm", {**TASK_SETTINGS, **task_settings})
    torch.manual_seed(0)
    params = {n: p.detach().clone() for n, p in task.build_model().named_parameters()}
    run_id = f"rid-{uuid.uuid4().hex[:12]}"
    store = SnapshotStore(rdb, keys, signer=SIGNING_KEY)
    manifest = store.publish(
        run_id=run_id,
        version=0,
        params=params,
        config={"task": "bytelm", "task_settings": task.settings_dict(), "inner": {}, "seed": 0},
        progress={"local_steps": 0, "updates": 0},
    )
    plan = RoundPlan(run_id=run_id, local_steps=local_steps, min_local_steps=1, fastest_steps_per_s=0.0,
                     active_clients=1, updated_at=time.time())
    store.publish_plan(plan)
    return manifest


def take_messages(
    channel: pika.adapters.blocking_connection.BlockingChannel, queue: str, count: int, timeout_s: float = 10
) -> list[tuple[pika.BasicProperties, bytes]]:
    """Get (and ack) ``count`` messages from ``queue``; fail if they do not come within the timeout."""
    got: list[tuple[pika.BasicProperties, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        got.append((properties, body))
    assert len(got) == count, f"expected {count} messages on {queue}, got {len(got)}"
    return got


def client_config(keys: RunKeys, state_dir: Path, **overrides: object) -> ClientConfig:
    settings: dict = dict(run=keys.run, connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
                          device="cpu", state_dir=state_dir, threads=1, max_rounds=2,
                          retry=FAST_RETRY, poll_s=0.2, coordinator_key=SIGNING_KEY.public_hex,
                          include_wait_s=0)  # no coordinator here: nobody would publish a newer base
    settings.update(overrides)
    return ClientConfig(**settings)


def run_worker(config: ClientConfig) -> tuple[Worker, RunSummary]:
    with Worker(config) as worker:
        return worker, worker.run()


def check_delta(body: bytes, manifest: SnapshotManifest, codec: str) -> dict[str, torch.Tensor]:
    """Decode one delta as the coordinator would and check it fits the manifest; return g."""
    message = DeltaMessage.decode(body, DEFAULT_DELTA_LIMITS.assembled())  # parts rebuild bigger ones
    assert message.run_id == manifest.run_id
    assert message.base_version == 0
    assert message.codec == codec
    assert set(message.tensors) == {p.name for p in manifest.params}
    decoded = {}
    for entry in manifest.params:
        g = get_codec(codec).decode(message.tensors[entry.name], entry.numel)
        assert g.numel() == entry.numel
        assert torch.isfinite(g).all(), entry.name
        decoded[entry.name] = g
    assert sum(float(g.abs().sum()) for g in decoded.values()) > 0, "the delta is all zeros"
    return decoded


def test_two_rounds_arrive_whole_and_in_sequence(rdb, amqp, keys, tmp_path):
    manifest = publish_run(rdb, keys)
    declare_delta_queue(amqp, keys)
    reports = []
    with Worker(client_config(keys, tmp_path, codec="fp16")) as worker:
        summary = worker.run(on_round=reports.append)
        client_id = worker.client_id

    assert (summary.rounds, summary.deltas_sent, summary.next_seq) == (2, 2, 2)
    assert summary.stopped_by == "max_rounds"
    assert [r.seq for r in reports] == [0, 1]
    assert all(r.sent and r.base_version == 0 and r.staleness == 0 and 1 <= r.steps <= 3 for r in reports)
    assert all(math.isfinite(r.train_loss) for r in reports)
    assert reports[0].line().startswith("round 1  v=0  H=")

    messages = take_messages(amqp, keys.delta_queue, 2)
    decoded = [DeltaMessage.decode(body) for _, body in messages]
    assert [m.seq for m in decoded] == [0, 1]
    assert {m.client_id for m in decoded} == {client_id}
    assert all(m.local_steps == r.steps for m, r in zip(decoded, reports, strict=True))
    for properties, body in messages:
        check_delta(body, manifest, "fp16")
        assert properties.delivery_mode == 2
        assert properties.content_type == "application/x-msgpack"
        assert properties.app_id == "asyncloco-client"
        assert properties.message_id == DeltaMessage.decode(body).delta_id


def test_lossless_delta_is_exactly_base_minus_local_on_own_data(rdb, amqp, keys, tmp_path):
    manifest = publish_run(rdb, keys)
    declare_delta_queue(amqp, keys)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):  # 3 × 60 KiB of text: above the corpus minimum of 128 KiB
        (corpus / f"notes{i}.txt").write_text(f"note {i}: a quick brown fox jumps over the lazy dog\n" * 1200)
    config = client_config(keys, tmp_path / "state", codec="fp32", max_rounds=1, client_id="exact",
                           data=str(corpus / "*.txt"))
    with Worker(config) as worker:
        worker.run()
        assert worker.trainer.task.settings.data == str(corpus / "*.txt")  # --data replaced the corpus
        expected = worker.trainer.pseudo_gradient()
    (_, body), = take_messages(amqp, keys.delta_queue, 1)
    decoded = check_delta(body, manifest, "fp32")
    for name, g in expected.items():
        assert torch.equal(decoded[name], g.reshape(-1)), name


def test_delta_over_the_part_size_goes_in_parts_that_rebuild_it(rdb, amqp, keys, tmp_path):
    manifest = publish_run(rdb, keys, local_steps=1, model_size="small")  # ~5M params: 20 MB in fp32
    declare_delta_queue(amqp, keys)
    with Worker(client_config(keys, tmp_path, codec="fp32", max_rounds=1)) as worker:
        worker.run()
        client_id = worker.client_id
    messages = take_messages(amqp, keys.delta_queue, 3)  # 8 MiB parts
    parts = [DeltaPart.decode(body) for _, body in messages]
    assert [p.index for p in parts] == [0, 1, 2] and {p.count for p in parts} == {3}
    assert all(len(body) <= DEFAULT_DELTA_LIMITS.max_message_bytes for _, body in messages)
    assert [props.type for props, _ in messages] == [PART_TYPE] * 3
    assert [props.message_id for props, _ in messages] == [f"{client_id}:0/{i}" for i in range(3)]
    body = b"".join(p.data for p in parts)
    assert hashlib.sha256(body).digest() == parts[0].sha256 and len(body) == parts[0].total_bytes > 16 * MiB
    check_delta(body, manifest, "fp32")


def test_restart_with_same_state_dir_continues_the_sequence(rdb, amqp, keys, tmp_path):
    publish_run(rdb, keys)
    declare_delta_queue(amqp, keys)
    first, _ = run_worker(client_config(keys, tmp_path))
    second, summary = run_worker(client_config(keys, tmp_path, max_rounds=1))

    assert second.client_id == first.client_id  # generated once, kept in the state dir
    assert summary.next_seq == 3
    decoded = [DeltaMessage.decode(body) for _, body in take_messages(amqp, keys.delta_queue, 3)]
    assert [(m.client_id, m.seq) for m in decoded] == [(first.client_id, s) for s in (0, 1, 2)]


def test_fresh_run_at_the_same_version_gets_a_fresh_trainer_and_sequence(rdb, amqp, keys, tmp_path):
    first = publish_run(rdb, keys)
    declare_delta_queue(amqp, keys)
    with Worker(client_config(keys, tmp_path, client_id="loyal")) as worker:
        assert worker.run_round(1).seq == 0
        old_trainer = worker.trainer
        rdb.delete(keys.current)  # a coordinator started afresh under the same run name ...
        second = publish_run(rdb, keys)  # ... publishes its own version 0
        report = worker.run_round(2)
        assert worker.trainer is not old_trainer  # new run: new replica and AdamW state

    assert report.seq == 0 and report.base_version == 0  # sequence numbers count per run
    messages = [DeltaMessage.decode(body) for _, body in take_messages(amqp, keys.delta_queue, 2)]
    assert [(m.run_id, m.seq) for m in messages] == [(first.run_id, 0), (second.run_id, 0)]


def test_publish_retries_until_the_queue_exists(rdb, amqp, keys, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="client")
    manifest = publish_run(rdb, keys)
    refused = threading.Event()
    declared = threading.Event()

    class RefusalSpotter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "does not exist yet" in record.getMessage():
                refused.set()

    def declare_later() -> None:
        refused.wait(timeout=20)  # the client's first publish came back unroutable
        time.sleep(1.0)  # ... and it keeps retrying for a while
        # Its own connection: pika connections are not shared between threads.
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        declare_delta_queue(connection.channel(), keys)
        connection.close()
        declared.set()

    spotter = RefusalSpotter()
    logging.getLogger("client.uploader").addHandler(spotter)
    thread = threading.Thread(target=declare_later, daemon=True)
    thread.start()
    reports = []
    with Worker(client_config(keys, tmp_path, max_rounds=1, client_id="early-bird")) as worker:
        try:
            summary = worker.run(on_round=reports.append)
        finally:
            logging.getLogger("client.uploader").removeHandler(spotter)
    thread.join(timeout=10)

    assert declared.is_set()
    assert summary.deltas_sent == 1 and reports[0].sent
    assert refused.is_set() and reports[0].upload_s > 0.9  # it really waited for the queue
    warnings = [r.getMessage() for r in caplog.records if r.name == "client.uploader"]
    # one line when it starts, one when it ends, not one per retry
    assert len(warnings) == 2 and "does not exist yet" in warnings[0], warnings
    assert warnings[1].startswith("delta early-bird:0 confirmed by the broker after ")
    (_, body), = take_messages(amqp, keys.delta_queue, 1)
    message = DeltaMessage.decode(body)
    assert (message.client_id, message.seq) == ("early-bird", 0)  # the retry kept its number
    check_delta(body, manifest, ClientConfig.codec)  # the default codec


def test_client_rides_out_rabbitmq_and_redis_outages(rdb, amqp, keys, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="client")
    manifest = publish_run(rdb, keys, local_steps=20)
    declare_delta_queue(amqp, keys)
    redis_proxy = OutageProxy(urlparse(REDIS_URL).port or 6379)
    amqp_proxy = OutageProxy(urlparse(AMQP_URL).port or 5672)
    redis_proxy.up()
    amqp_proxy.up()
    connection = ConnectionSettings(
        redis_url=urlparse(REDIS_URL)._replace(netloc=f"127.0.0.1:{redis_proxy.port}").geturl(),
        amqp_url=urlparse(AMQP_URL)._replace(netloc=f"guest:guest@127.0.0.1:{amqp_proxy.port}").geturl(),
        socket_timeout_s=3,
    )

    def cut(report: RoundReport) -> None:
        if report.round == 1:
            amqp_proxy.down_for(2.0)  # round 2's delta finds RabbitMQ gone
        elif report.round == 2:
            redis_proxy.down_for(2.0)  # round 3 finds Redis gone before it starts

    try:
        with Worker(client_config(keys, tmp_path, connection=connection, max_rounds=4)) as worker:
            summary = worker.run(on_round=cut)
    finally:
        redis_proxy.down()
        amqp_proxy.down()

    assert summary.deltas_sent == 4
    messages = [DeltaMessage.decode(body) for _, body in take_messages(amqp, keys.delta_queue, 4)]
    assert [m.seq for m in messages] == [0, 1, 2, 3]  # nothing lost, nothing renumbered
    check_delta(messages[1].encode(), manifest, ClientConfig.codec)
    # Each outage is said at WARNING, the client's default level, when it starts and when it ends.
    warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.WARNING]
    said = [(name, message.split(" (")[0].split(" after ")[0].split(" while ")[0])
            for name, message in warnings]
    assert said == [("client.uploader", f"delta {messages[1].delta_id} not sent: RabbitMQ unavailable"),
                    ("client.uploader", "RabbitMQ is back"),
                    ("client.uploader", f"delta {messages[1].delta_id} confirmed by the broker"),
                    ("client.fetcher", "Redis unavailable"),
                    ("client.fetcher", "Redis is back")], warnings


def test_cli_waits_for_snapshot_and_ctrl_c_sends_the_partial_round(rdb, amqp, keys, tmp_path):
    declare_delta_queue(amqp, keys)
    env = dict(os.environ, PYTHONPATH=str(REPO), ASYNCLOCO_RUN=keys.run, ASYNCLOCO_REDIS=REDIS_URL,
               ASYNCLOCO_AMQP=AMQP_URL)
    process = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "join", "--threads", "1", "--device", "cpu", "--codec", "int8",
         "--client-id", "cli-test", "--state-dir", str(tmp_path),
         "--coordinator-key", SIGNING_KEY.public_hex],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()

    def wait_for(text: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in lines):
            assert process.poll() is None, f"client exited early: {process.stderr.read()}"
            assert time.monotonic() < deadline, f"no {text!r} in {lines}"
            time.sleep(0.05)

    try:
        wait_for("waiting for the coordinator")
        # A round far too long to finish: only Ctrl-C can end it.
        manifest = publish_run(rdb, keys, local_steps=100_000)
        wait_for("joined run")
        time.sleep(5.0)  # its first steps: under the whole suite's load they took over 2 s once
        process.send_signal(signal.SIGINT)
        rc = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    stderr = process.stderr.read()

    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert any(line.startswith("round 1  v=0") for line in lines), lines
    assert "stopped (stop): 1 rounds, 1 deltas sent as client cli-test" in lines[-1]
    (_, body), = take_messages(amqp, keys.delta_queue, 1)
    message = DeltaMessage.decode(body)
    assert (message.client_id, message.seq) == ("cli-test", 0)
    assert 0 < message.local_steps < 100_000
    check_delta(body, manifest, "int8")


def test_a_model_whose_deltas_cannot_fit_is_refused_before_any_training(
    rdb, amqp, keys, tmp_path, monkeypatch
):
    publish_run(rdb, keys, local_steps=3)  # the tiny model: 0.45M parameters, 1.8 MB in fp32
    declare_delta_queue(amqp, keys)
    small = dataclasses.replace(DEFAULT_DELTA_LIMITS, max_delta_bytes=1 * MiB)
    monkeypatch.setattr(client.uploader, "DEFAULT_DELTA_LIMITS", small)  # as if the model were 600x bigger
    with Worker(client_config(keys, tmp_path, codec="fp32", max_rounds=1)) as worker:
        with pytest.raises(ConfigError, match=r"1\.7 MiB with codec fp32, over the 1 MiB limit.*int8"):
            worker.run()
        assert worker.trainer is not None and worker.trainer.own_steps == 0  # not one step trained
    assert amqp.queue_declare(keys.delta_queue, passive=True).method.message_count == 0
    with Worker(client_config(keys, tmp_path / "int4", codec="int4", max_rounds=1)) as worker:
        worker.run()  # 0.53 bytes a parameter: fits
    assert len(take_messages(amqp, keys.delta_queue, 1)) == 1
