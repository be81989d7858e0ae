"""Bounded resources per identity, through a real coordinator on the real Redis and RabbitMQ: a
stranger cannot reserve the parts spool with parts that declare more than this model's delta, nor
keep a delta in it forever by trickling parts in; an honest big delta still goes through.
(Each rule's edges are in tests/unit/test_parts.py and tests/unit/test_admission.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.parts import GiB, SpoolConfig
from coordinator.service import Coordinator
from harness.processes import wait_for
from shared.delta_parts import DeltaPart
from tests.integration.test_coordinator_intake import _dead_letters, _status
from tests.integration.test_delta_parts import _parts, _publish_parts, _spool_files
from tests.services import serving, small_config

pytestmark = pytest.mark.integration

TIMEOUT_S = 3.0  # since the newest part
DEADLINE_S = 5.0  # since the first part


@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    config = small_config(run_name, tmp_path, spool=SpoolConfig(timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S))
    with serving(config) as coord:
        yield coord


def test_parts_declaring_a_gib_each_reserve_nothing_and_an_honest_big_delta_goes_through(
    coordinator: Coordinator, run_name: str
) -> None:
    stranger = [DeltaPart(run_id=coordinator.run.run_id, client_id="mallory", seq=seq, index=0, count=1024,
                          offset=0, total_bytes=GiB, sha256=b"\x01" * 32, data=b"x") for seq in range(4)]
    _publish_parts(run_name, stranger)
    status = wait_for(lambda: (s := _status(run_name)).get("deltas", {}).get("rejected") == 4 and s,
                      what="four rejections")
    assert status["deltas"]["rejected_by_reason"] == {"too_large": 4}
    assert status["parts"]["reserved_bytes"] == 0 and not _spool_files(coordinator)
    letters = wait_for(lambda: _dead_letters(run_name), what="the dead-lettered parts")
    assert [h["x-asyncloco-reason"] for h in letters] == ["too_large"] * 4
    _publish_parts(run_name, _parts(coordinator, client_id="honest", seq=0))
    wait_for(lambda: _status(run_name)["deltas"]["applied"] == 1, what="the honest big delta")


def test_a_delta_trickling_in_past_its_deadline_is_discarded(coordinator: Coordinator, run_name: str) -> None:
    _publish_parts(run_name, _parts(coordinator, client_id="slowpoke", seq=0))  # a known client now
    wait_for(lambda: _status(run_name).get("deltas", {}).get("applied") == 1, what="first delta")
    wait_for(lambda: coordinator.publisher.published_version == coordinator.version, what="publish")
    parts = _parts(coordinator, client_id="slowpoke", seq=1)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < DEADLINE_S + 3 and sent < len(parts) - 1:
        _publish_parts(run_name, [parts[sent]])  # a part every second: never TIMEOUT_S without one
        sent += 1
        if _status(run_name)["deltas"]["rejected_by_reason"].get("incomplete"):
            break
        time.sleep(1.0)
    status = wait_for(
        lambda: (s := _status(run_name))["deltas"]["rejected_by_reason"].get("incomplete") == 1 and s,
        timeout_s=10, what="the trickling delta to be discarded at its deadline",
    )
    assert time.monotonic() - started >= DEADLINE_S - 0.5  # by the deadline, not by the timeout
    assert status["parts"]["pending_deltas"] == 0 and not _spool_files(coordinator)
    assert coordinator.run.intake.counts["applied"] == 1
