"""The grace period on the real Redis: a client whose delta is in a snapshot whose outer buffer cycle
is still open waits (bounded by the plan's ``grace_s``) for the version that closes it, so that its
next round starts from θ with the cycle's momentum step, as every worker of a sync round does."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import torch

from client.fetcher import SnapshotFetcher
from client.inclusion import InclusionWait
from harness.processes import AMQP_URL, REDIS_URL
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy, connect_redis
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore

pytestmark = pytest.mark.integration

PARAMS = {"w": torch.arange(6, dtype=torch.float32)}


def _fetcher(keys: RunKeys, key: SigningKey) -> tuple[SnapshotFetcher, redis.Redis]:
    reader = connect_redis(ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL))
    fetcher = SnapshotFetcher(reader, keys, retry=RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5),
                              verify_key=key.verify_key, poll_s=0.1, should_stop=lambda: False)
    return fetcher, reader


def test_a_client_waits_for_the_cycle_to_close_then_goes_on(run_name: str, redis_client: redis.Redis) -> None:
    keys, key = RunKeys(run_name), SigningKey.generate()
    store = SnapshotStore(redis_client, keys, signer=key)
    store.publish(run_id="r", version=1, params=PARAMS, config={}, progress={"cycle_open": True})
    fetcher, reader = _fetcher(keys, key)
    waits = InclusionWait(fetcher, "me")
    try:
        # version 2 closes the cycle 0.4 s later: the wait ends then, well before its 10 s grace
        closer = threading.Timer(0.4, lambda: store.publish(
            run_id="r", version=2, params=PARAMS, config={}, progress={"cycle_open": False}))
        started = time.monotonic()
        closer.start()
        try:
            assert waits.for_cycle_close(run_id="r", included=1, grace_s=10.0) is True
        finally:
            closer.join()
        assert 0.3 < time.monotonic() - started < 5.0

        # open, and nothing closes it: the grace runs out and the client goes on
        store.publish(run_id="r", version=3, params=PARAMS, config={}, progress={"cycle_open": True})
        started = time.monotonic()
        assert waits.for_cycle_close(run_id="r", included=3, grace_s=0.5) is False
        assert 0.45 < time.monotonic() - started < 3.0

        # our delta closed the cycle itself (or a coordinator without grace periods): no wait at all
        store.publish(run_id="r", version=4, params=PARAMS, config={}, progress={})
        started = time.monotonic()
        assert waits.for_cycle_close(run_id="r", included=4, grace_s=10.0) is True
        assert time.monotonic() - started < 2.0
    finally:
        reader.close()
