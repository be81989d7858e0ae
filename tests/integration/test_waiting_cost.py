"""What a client waiting on the coordinator costs the real Redis (at most 2 commands a second, in
bursts of at most 3), and how soon it learns its delta's fate.

After sending its delta a client waits for the verdict, which names the snapshot that includes it
(and, with a grace period, for its buffer cycle to close). Each test points the client, and only
the client, at a relay in front of the real Redis that counts the commands it sends
(:mod:`tests.redis_counter`); the stand-in coordinator writes to Redis directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
import torch

from client.events import WorkerEvents
from client.fetcher import SnapshotFetcher
from client.inclusion import InclusionWait, WaitBudget
from client.report import RoundReport
from client.worker import Worker
from harness.processes import AMQP_URL, REDIS_URL
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy, connect_redis
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from shared.verdict import Verdict, append
from tests.integration.test_client_upload import client_config, declare_delta_queue, publish_run
from tests.redis_counter import CountingRelay

pytestmark = pytest.mark.integration

MAX_COMMANDS_PER_S = 2.0
PARAMS = {"w": torch.arange(6, dtype=torch.float32)}


def within_budget(commands: list[str], seconds: float) -> bool:
    """At most 2 commands for each second of ``seconds``, and a burst of 3 (the client's token
    bucket, full after a round of training)."""
    print(f"{len(commands)} commands in {seconds:.2f} s: {len(commands) / seconds:.2f}/s")
    return len(commands) <= WaitBudget.CAPACITY + MAX_COMMANDS_PER_S * seconds


@pytest.fixture
def relay() -> Iterator[CountingRelay]:
    with CountingRelay(urlparse(REDIS_URL).port or 6379) as counting:
        yield counting


def relayed(relay: CountingRelay) -> ConnectionSettings:
    database = int(urlparse(REDIS_URL).path.strip("/") or 0)
    return ConnectionSettings(redis_url=relay.url(database), amqp_url=AMQP_URL)


class SendingTimes(WorkerEvents):
    def __init__(self) -> None:
        self.at: list[float] = []

    def sending(self, nbytes: int) -> None:
        self.at.append(time.monotonic())


def test_a_client_waiting_for_its_delta_costs_redis_at_most_two_commands_a_second(
    relay: CountingRelay, redis_client: redis.Redis, run_name: str, tmp_path: Path
) -> None:
    import pika  # the delta queue, as the coordinator declares it

    keys = RunKeys(run_name)
    publish_run(redis_client, keys)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        declare_delta_queue(connection.channel(), keys)
    finally:
        connection.close()
    # No coordinator: the delta is confirmed, and then nothing comes; the client waits it out.
    include_wait_s = 4.0
    events, ended, reports = SendingTimes(), [], []

    def finished(report: RoundReport) -> None:
        ended.append(time.monotonic())
        reports.append(report)

    config = client_config(keys, tmp_path, connection=relayed(relay), include_wait_s=include_wait_s,
                           max_rounds=1)
    with Worker(config, events=events) as worker:
        worker.run(on_round=finished)
    (report,), (sent_at,), (end,) = reports, events.at, ended
    assert report.sent and report.fate.verdict is None and report.fate.version is None
    assert include_wait_s <= report.wait_s < include_wait_s + 2.0
    assert report.fetch_s > 0 and report.encode_s > 0 and report.upload_s > 0
    assert relay.between(0.0, sent_at), "the client's Redis traffic does not cross the relay"
    waiting = relay.between(sent_at, end)  # the upload (to RabbitMQ), then the wait
    assert within_budget(waiting, end - sent_at), (len(waiting), end - sent_at, waiting)
    # a blocking read of its verdicts, and between two the version (no new one: no manifest)
    assert set(waiting) == {"XREAD", "GET"} and waiting.count("XREAD") >= 2, waiting


def _fetcher(relay: CountingRelay, keys: RunKeys, key: SigningKey) -> tuple[SnapshotFetcher, redis.Redis]:
    reader = connect_redis(relayed(relay))
    fetcher = SnapshotFetcher(reader, keys, retry=RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5),
                              verify_key=key.verify_key, should_stop=lambda: False)
    fetcher.ping()  # connected before anything is counted, as a client is when its wait begins
    return fetcher, reader


class BusyCoordinator:
    """Publishes a new version every 0.1 s (other clients' deltas going by), from a thread, on its
    own connection; ``progress(elapsed_s)`` gives each version's manifest progress. Once
    ``included_after_s`` have gone by, the next version includes client ``me``'s delta 5: its
    verdict is appended with that snapshot (when it is published), naming it, as the
    coordinator's publisher does."""

    def __init__(self, store: SnapshotStore, keys: RunKeys, progress: Callable[[float], dict[str, object]],
                 included_after_s: float) -> None:
        self.store, self.keys, self.progress = store, keys, progress
        self.included_after_s = included_after_s
        self.stop = threading.Event()
        self.version = 0
        self.included: tuple[int, float] | None = None  # (version, time.monotonic() of its publish)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(0.1):
            self.version += 1
            elapsed = time.monotonic() - started
            progress = self.progress(elapsed)
            self.store.publish(run_id="r", version=self.version, params=PARAMS, config={}, progress=progress)
            if self.included is None and elapsed >= self.included_after_s:
                self.included = (self.version, time.monotonic())
                append(self.store.redis, self.keys.verdicts("me"), Verdict(
                    "r", 5, True, at=time.time(), version=self.version,
                    cycle_open=bool(progress.get("cycle_open", False))))

    def __enter__(self) -> BusyCoordinator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_versions_going_by_fast_cost_no_more_and_the_one_with_the_delta_ends_the_wait(
    relay: CountingRelay, redis_client: redis.Redis, run_name: str
) -> None:
    keys, key = RunKeys(run_name), SigningKey.generate()
    store = SnapshotStore(redis_client, keys, signer=key)
    store.publish(run_id="r", version=0, params=PARAMS, config={}, progress={})
    included_after_s = 2.5

    def progress(elapsed_s: float) -> dict[str, object]:
        return {"client_seqs": {"other": 1, **({"me": 5} if elapsed_s >= included_after_s else {})}}

    fetcher, reader = _fetcher(relay, keys, key)
    try:
        with BusyCoordinator(store, keys, progress, included_after_s) as coordinator:
            started = time.monotonic()
            waits = InclusionWait(fetcher, "me")
            fate = waits.until_included(run_id="r", seq=5, base_version=0, within_s=30.0)
            end = time.monotonic()
        assert fate.verdict is not None and fate.verdict.applied and fate.verdict.seq == 5
        assert coordinator.included is not None and fate.version == coordinator.included[0]
        # learnt within a moment of the snapshot's publish (a poll would have taken up to a second)
        print(f"learnt {end - coordinator.included[1]:.3f} s after the publish")
        assert end - coordinator.included[1] < 0.3
        waiting = relay.between(started, end)
        assert within_budget(waiting, end - started), (len(waiting), end - started, waiting)
        assert waiting.count("XREAD") <= 3, waiting  # blocking reads of 2 s, not polls
        assert coordinator.version >= 20  # versions went by far faster than the client looked
    finally:
        reader.close()


def test_waiting_for_the_buffer_cycle_to_close_as_well_costs_no_more(
    relay: CountingRelay, redis_client: redis.Redis, run_name: str
) -> None:
    keys, key = RunKeys(run_name), SigningKey.generate()
    store = SnapshotStore(redis_client, keys, signer=key)
    store.publish(run_id="r", version=0, params=PARAMS, config={}, progress={"cycle_open": True})
    included_after_s, closes_after_s = 1.0, 3.0

    def progress(elapsed_s: float) -> dict[str, object]:
        return {"client_seqs": {"other": 1, **({"me": 5} if elapsed_s >= included_after_s else {})},
                "cycle_open": elapsed_s < closes_after_s}

    fetcher, reader = _fetcher(relay, keys, key)
    waits = InclusionWait(fetcher, "me")
    try:
        with BusyCoordinator(store, keys, progress, included_after_s):
            started = time.monotonic()
            fate = waits.until_included(run_id="r", seq=5, base_version=0, within_s=30.0, sync=False)
            assert fate.version is not None and fate.verdict is not None and fate.verdict.cycle_open
            assert waits.for_cycle_close(run_id="r", included=fate.version, grace_s=10.0) is True
            end = time.monotonic()
        assert closes_after_s < end - started < closes_after_s + 2.0
        waiting = relay.between(started, end)
        assert within_budget(waiting, end - started), (len(waiting), end - started, waiting)
    finally:
        reader.close()
