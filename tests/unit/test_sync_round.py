"""The synchronous-DiLoCo barrier: who may join a round, when it completes, timeouts."""

from __future__ import annotations

import pytest

from coordinator.admission import Arrival
from coordinator.registry import ClientRegistry, PlanConfig
from coordinator.sync_round import SyncBarrier
from shared.errors import ConfigError


def _barrier(base_version: int = 0, timeout_s: float = 60.0) -> SyncBarrier:
    barrier = SyncBarrier(ClientRegistry(PlanConfig(active_window_s=60.0)), timeout_s=timeout_s)
    barrier.next_round(base_version)
    return barrier


def _arrival(client_id: str, base_version: int, now: float) -> Arrival:
    return Arrival(client_id=client_id, seq=0, base_version=base_version, staleness=0, local_steps=3,
                   now=now)


def _send(barrier: SyncBarrier, client_id: str, base_version: int, now: float) -> tuple[str, str] | None:
    """A delta through the rule as the intake passes it: refuse, then admitted if it may join."""
    arrival = _arrival(client_id, base_version, now)
    refused = barrier.refuse(arrival)
    if refused is None:
        barrier.admitted(arrival)
    return refused


def test_round_completes_when_every_client_in_contact_sent() -> None:
    barrier = _barrier(base_version=4, timeout_s=30)
    barrier.registry.get("b").last_contact = 99.0  # b is training this round too
    assert _send(barrier, "a", 4, now=100.0) is None
    assert not barrier.ready(now=101.0)
    assert _send(barrier, "b", 4, now=102.0) is None
    assert barrier.ready(now=102.0)


def test_wrong_base_and_second_delta_are_refused_but_count_as_contact() -> None:
    barrier = _barrier(base_version=4)
    refused = _send(barrier, "a", 3, now=0.0)
    assert refused is not None and refused[0] == "stale"
    assert barrier.registry.in_contact(1.0) == {"a"}  # the next rounds wait for it
    refused = _send(barrier, "a", 5, now=0.0)
    assert refused is not None and refused[0] == "stale"
    assert _send(barrier, "a", 4, now=0.0) is None
    refused = _send(barrier, "a", 4, now=0.0)
    assert refused is not None and refused[0] == "already_in_round"


def test_a_vanished_client_holds_the_round_only_until_the_timeout() -> None:
    barrier = _barrier(timeout_s=10)
    barrier.registry.get("gone").last_contact = 0.0
    assert not barrier.ready(now=0.0)  # nothing arrived: never ready
    _send(barrier, "a", 0, now=5.0)
    assert not barrier.ready(now=14.9)
    assert barrier.ready(now=15.0)


def test_next_round_and_resume_state() -> None:
    barrier = _barrier(base_version=2)
    _send(barrier, "a", 2, now=1.0)
    restored = _barrier()
    restored.load_state({"unrelated": 1, **barrier.save_state()})
    assert restored.first_arrival_at is not None  # the timeout restarts at the resume
    assert restored.refuse(_arrival("a", 2, now=2.0)) == (
        "already_in_round", "a already sent its delta for version 2")
    restored.next_round(3)
    assert restored.refuse(_arrival("a", 3, now=3.0)) is None and not restored.arrived
    untouched = _barrier(base_version=7)
    untouched.load_state({})  # a checkpoint of an asynchronous run: nothing to restore
    assert untouched.base_version == 7


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        SyncBarrier(ClientRegistry(PlanConfig()), timeout_s=0)
