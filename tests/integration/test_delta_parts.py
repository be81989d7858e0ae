"""Deltas bigger than a broker message travel in parts: a real coordinator puts them together.

The tiny model's fp16 delta is ~0.9 MB; cut into 64 KiB parts it makes ~14 messages, which is
enough to send them out of order, twice, partly, or forged, the way a flaky network or a hostile
client would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import torch

from coordinator.parts import SpoolConfig
from coordinator.service import Coordinator
from harness.processes import wait_for
from shared.delta_parts import PART_TYPE, DeltaPart, split_delta
from shared.protocol import DeltaMessage
from tests.integration.test_coordinator_intake import _dead_letters, _good_delta, _status
from tests.services import publish_to_queue, serving, small_config

pytestmark = pytest.mark.integration

PART_BYTES = 64 * 1024
TIMEOUT_S = 3.0


@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    with serving(small_config(run_name, tmp_path, spool=SpoolConfig(timeout_s=TIMEOUT_S))) as coord:
        yield coord


def _parts(coord: Coordinator, *, client_id: str, seq: int) -> list[DeltaPart]:
    body = _good_delta(coord, client_id=client_id, seq=seq)
    return split_delta(body, part_bytes=PART_BYTES, run_id=coord.run.run_id, client_id=client_id, seq=seq)


def _publish_parts(run: str, parts: list[DeltaPart]) -> None:
    publish_to_queue(run, [part.encode() for part in parts],
                     properties=pika.BasicProperties(delivery_mode=2, type=PART_TYPE))


def _spool_files(coord: Coordinator) -> list[Path]:
    return sorted(coord.spool.directory.rglob("*"))


def test_parts_out_of_order_and_repeated_make_one_applied_delta(coordinator: Coordinator,
                                                                run_name: str) -> None:
    parts = _parts(coordinator, client_id="big", seq=0)
    assert len(parts) >= 10
    shuffled = parts + parts[:3]  # three parts twice, as after a lost confirm
    random.Random(7).shuffle(shuffled)
    before = {n: p.clone() for n, p in coordinator.run.optimizer.params.items()}
    _publish_parts(run_name, shuffled)
    status = wait_for(lambda: (s := _status(run_name)).get("deltas", {}).get("applied") == 1
                      and not s["parts"]["pending_deltas"] and s, what="the assembled delta applied")
    assert status["parts"]["assembled"] == 1
    assert status["parts"]["spooled"] == len(parts)
    assert status["parts"]["duplicate"] == 3
    assert status["deltas"]["rejected"] == 0
    assert status["progress"]["client_seqs"] == {"big": 0}
    assert any(not torch.equal(coordinator.run.optimizer.params[n], before[n]) for n in before)
    wait_for(lambda: not _spool_files(coordinator), what="the spool to be emptied after the commit")
    wait_for(lambda: coordinator.consumer.queue_depth == 0, what="every part acked")
    assert _dead_letters(run_name) == []


def test_a_delta_whose_parts_stop_coming_is_discarded_and_late_parts_are_duplicates(
    coordinator: Coordinator, run_name: str
) -> None:
    _publish_parts(run_name, _parts(coordinator, client_id="flaky", seq=0))  # known client now
    wait_for(lambda: _status(run_name).get("deltas", {}).get("applied") == 1, what="first delta")
    version = coordinator.version
    params = {n: p.clone() for n, p in coordinator.run.optimizer.params.items()}
    parts = _parts(coordinator, client_id="flaky", seq=1)
    _publish_parts(run_name, parts[:4])  # the client died after four parts
    status = wait_for(
        lambda: (s := _status(run_name))["deltas"]["rejected_by_reason"].get("incomplete") == 1 and s,
        timeout_s=TIMEOUT_S + 30, what="the incomplete delta to be discarded",
    )
    assert status["parts"]["incomplete"] == 1 and status["parts"]["pending_deltas"] == 0
    assert not _spool_files(coordinator)
    _publish_parts(run_name, parts[4:])  # the rest turns up after all
    wait_for(lambda: _status(run_name)["parts"]["duplicate"] == len(parts) - 4, what="late parts")
    assert coordinator.version == version
    assert all(torch.equal(coordinator.run.optimizer.params[n], params[n]) for n in params)
    assert not _spool_files(coordinator)
    assert coordinator.run.intake.counts["applied"] == 1


def test_forged_parts_are_refused_and_leave_the_model_alone(coordinator: Coordinator, run_name: str) -> None:
    params = {n: p.clone() for n, p in coordinator.run.optimizer.params.items()}
    good = _parts(coordinator, client_id="mallory", seq=0)
    # The right count and hash but other bytes in one part: only the whole delta's SHA-256 tells.
    forged = DeltaPart(**{**good[2].__dict__, "data": bytes(len(good[2].data))})
    # A part whose bytes lie outside the delta it announces.
    outside = DeltaPart(**{**good[0].__dict__, "client_id": "eve", "offset": good[0].total_bytes - 10})
    _publish_parts(run_name, [*good[:2], forged, *good[3:], outside])
    status = wait_for(lambda: (s := _status(run_name))["deltas"]["rejected"] == 2 and s,
                      what="two rejections")
    assert status["deltas"]["rejected_by_reason"] == {"parts_corrupt": 1, "bad_part": 1}
    assert status["deltas"]["applied"] == 0
    assert all(torch.equal(coordinator.run.optimizer.params[n], params[n]) for n in params)
    wait_for(lambda: not _spool_files(coordinator), what="the spool to be emptied")
    letters = wait_for(lambda: _dead_letters(run_name), what="the dead-lettered part")
    assert [h["x-asyncloco-reason"] for h in letters] == ["bad_part"]
    # and an honest whole delta still goes through
    body = _good_delta(coordinator, client_id="honest", seq=0)
    assert DeltaMessage.decode(body).client_id == "honest"
    _publish_parts(run_name, split_delta(body, part_bytes=PART_BYTES, run_id=coordinator.run.run_id,
                                         client_id="honest", seq=0))
    wait_for(lambda: _status(run_name)["deltas"]["applied"] == 1, what="the honest delta")
