"""The synchronous-DiLoCo barrier: who may join a round, when it completes, timeouts."""

from __future__ import annotations

import pytest

from coordinator.sync_round import SyncBarrier
from shared.errors import ConfigError


def test_round_completes_when_every_active_client_sent() -> None:
    barrier = SyncBarrier(timeout_s=30, base_version=4)
    assert barrier.refuse("a", 4) is None
    barrier.add("a", now=100.0)
    assert not barrier.ready({"a", "b"}, now=101.0)
    barrier.add("b", now=102.0)
    assert barrier.ready({"a", "b"}, now=102.0)


def test_wrong_base_and_second_delta_are_refused() -> None:
    barrier = SyncBarrier(base_version=4)
    assert barrier.refuse("a", 3)[0] == "stale"
    assert barrier.refuse("a", 5)[0] == "stale"
    barrier.add("a", now=0.0)
    assert barrier.refuse("a", 4)[0] == "already_in_round"


def test_a_vanished_client_holds_the_round_only_until_the_timeout() -> None:
    barrier = SyncBarrier(timeout_s=10, base_version=0)
    assert not barrier.ready({"a", "gone"}, now=0.0)  # nothing arrived: never ready
    barrier.add("a", now=5.0)
    assert not barrier.ready({"a", "gone"}, now=14.9)
    assert barrier.ready({"a", "gone"}, now=15.0)


def test_next_round_and_resume_state() -> None:
    barrier = SyncBarrier(base_version=2)
    barrier.add("a", now=1.0)
    saved = barrier.to_json()
    restored = SyncBarrier()
    restored.load_json(saved, now=50.0)
    assert restored.refuse("a", 2)[0] == "already_in_round" and restored.first_arrival_at == 50.0
    restored.next_round(3)
    assert restored.refuse("a", 3) is None and not restored.arrived


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        SyncBarrier(timeout_s=0)
