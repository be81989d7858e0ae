"""``--strategy sync`` in the real coordinator: a round waits for every client, or its timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.outer_optimizer import OuterConfig
from coordinator.service import Coordinator
from harness.processes import wait_for
from tests.integration.test_coordinator_intake import _good_delta, _status
from tests.services import publish_to_queue, serving, small_config

pytestmark = pytest.mark.integration


@pytest.fixture
def sync_coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    config = small_config(run_name, tmp_path, outer=OuterConfig(strategy="sync"), sync_timeout_s=3.0)
    with serving(config) as coord:
        yield coord


def _version(run: str) -> int:
    return int(_status(run).get("version", -1))


def test_sync_round_waits_for_every_client_then_steps_once(
    sync_coordinator: Coordinator, run_name: str
) -> None:
    coord = sync_coordinator
    v0 = coord.version
    # round on v0: nobody is known yet, so the first delta completes it alone; the second is late
    publish_to_queue(run_name, [_good_delta(coord, client_id="a", seq=0),
                                _good_delta(coord, client_id="b", seq=0)])
    wait_for(lambda: _status(run_name).get("deltas", {}).get("rejected_by_reason", {}).get("stale") == 1,
             what="b's late delta refused as stale")
    v1 = _version(run_name)
    assert v1 == v0 + 1
    before = {n: p.clone() for n, p in coord.run.optimizer.params.items()}
    publish_to_queue(run_name, [_good_delta(coord, client_id="a", seq=1)])
    wait_for(lambda: _status(run_name)["deltas"]["applied"] == 2, what="a's delta buffered")
    time.sleep(1.0)
    assert _version(run_name) == v1, "the round must wait for b"
    assert all(bool((coord.run.optimizer.params[n] == before[n]).all()) for n in before), "θ moved mid-round"
    publish_to_queue(run_name, [_good_delta(coord, client_id="a", seq=2)])  # a second delta in the round
    wait_for(lambda: _status(run_name)["deltas"]["rejected_by_reason"].get("already_in_round") == 1,
             what="a's second delta refused")
    publish_to_queue(run_name, [_good_delta(coord, client_id="b", seq=1)])
    wait_for(lambda: _version(run_name) == v1 + 1, what="the round to complete with a and b")


def test_a_vanished_client_holds_a_round_only_until_the_timeout(
    sync_coordinator: Coordinator, run_name: str
) -> None:
    coord = sync_coordinator
    first = [_good_delta(coord, client_id="a", seq=0), _good_delta(coord, client_id="gone", seq=0)]
    publish_to_queue(run_name, first)
    wait_for(lambda: _status(run_name).get("deltas", {}).get("rejected") == 1, what="first round")
    v1 = _version(run_name)
    started = time.monotonic()
    publish_to_queue(run_name, [_good_delta(coord, client_id="a", seq=1)])  # "gone" never sends again
    wait_for(lambda: _version(run_name) == v1 + 1, timeout_s=15, what="the round to time out")
    assert time.monotonic() - started >= 2.5  # sync_timeout_s = 3
