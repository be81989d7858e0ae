"""``--overlap`` against a real coordinator: a client starts each round as soon as its delta is
confirmed, from the newest snapshot moved by its own in-flight delta, says which delta it stacked
on, and the coordinator takes every one of them (none refused ``already_sent``); each round's
line still ends in its verdict, one round late."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client.events import RoundStart, WorkerEvents
from client.report import RoundReport
from client.worker import Worker
from coordinator.commit_batch import CommitConfig
from coordinator.registry import PlanConfig
from harness.processes import wait_for
from shared.protocol import DeltaMessage
from tests.integration.test_coordinator_intake import _status
from tests.integration.test_signed_snapshots import client_config
from tests.services import serving, small_config

pytestmark = pytest.mark.integration

ROUNDS = 6


def recorded_sends(worker: Worker) -> list[DeltaMessage]:
    """The messages ``worker`` sends from now on, in order (its uploader's send, wrapped)."""
    sent: list[DeltaMessage] = []
    send = worker.uploader.send

    def recording(message: DeltaMessage, **kwargs: Any) -> Any:
        sent.append(message)
        return send(message, **kwargs)

    worker.uploader.send = recording  # type: ignore[method-assign]
    return sent


def test_stacked_rounds_are_all_applied_and_each_says_its_verdict(run_name: str, tmp_path: Path) -> None:
    # commits at most every 0.5 s: a 3-step round ends before its last delta is in a snapshot
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1, dylu=False),
                          commit=CommitConfig(every_updates=4, interval_s=0.5))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        settings = client_config(run_name, tmp_path / "client", coordinator.signing_key, client_id="eager",
                                 max_rounds=ROUNDS, include_wait_s=10.0, overlap=True)
        with Worker(settings) as worker:
            sent = recorded_sends(worker)
            summary = worker.run(on_round=reports.append)
        status = wait_for(lambda: (s := _status(run_name)) and s["deltas"]["applied"] == ROUNDS and s,
                          what="every delta applied")
    assert [r.seq for r in reports] == [m.seq for m in sent] == list(range(ROUNDS))  # in order, all told
    for report in reports:
        assert report.fate.verdict is not None and report.fate.verdict.applied, report.line()
        assert report.line().endswith(f"  applied v={report.fate.version}")
    stacked = [m for m in sent if m.stacked_on >= 0]
    assert stacked, "no round started before its last delta was in a snapshot"
    assert all(m.stacked_on == m.seq - 1 for m in stacked)
    # a stacked round may share its predecessor's base: taken, not refused already_sent
    same_base = [m for m, prev in zip(sent[1:], sent, strict=False) if m.base_version == prev.base_version]
    assert same_base, [(m.seq, m.base_version, m.stacked_on) for m in sent]
    assert status["deltas"]["rejected"] == 0, status["deltas"]
    assert summary.line().endswith(f"; {ROUNDS} applied, 0 rejected")


class Starts(WorkerEvents):
    def __init__(self) -> None:
        self.at: list[float] = []
        self.starts: list[RoundStart] = []

    def round_started(self, start: RoundStart) -> None:
        self.at.append(time.monotonic())
        self.starts.append(start)


def test_the_next_round_trains_while_the_last_delta_is_still_going_out(
    run_name: str, tmp_path: Path
) -> None:
    """A slow uplink (each send held back 1 s here) and rounds of about 2 s (--slowdown): with
    --overlap the upload runs in a thread while the next round trains, so the rounds hardly wait
    for it, and every delta still arrives and is applied."""
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1, dylu=False),
                          commit=CommitConfig(every_updates=1, interval_s=0.3))
    sends: list[tuple[int, float, float]] = []  # seq, start, end
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        settings = client_config(run_name, tmp_path / "client", coordinator.signing_key, client_id="uplink",
                                 max_rounds=4, include_wait_s=10.0, overlap=True, slowdown=30.0)
        starts = Starts()
        with Worker(settings, events=starts) as worker:
            send = worker.uploader.send

            def slow(message: DeltaMessage, **kwargs: Any) -> Any:
                began = time.monotonic()
                time.sleep(1.0)
                result = send(message, **kwargs)
                sends.append((message.seq, began, time.monotonic()))
                return result

            worker.uploader.send = slow  # type: ignore[method-assign]
            summary = worker.run(on_round=reports.append)
        status = wait_for(lambda: (s := _status(run_name)) and s["deltas"]["applied"] == 4 and s,
                          what="every delta applied")
    assert summary.rounds == 4 and status["deltas"]["rejected"] == 0, status["deltas"]
    assert all(r.fate.verdict is not None and r.fate.verdict.applied and r.sent for r in reports)
    # some round began training before the delta of the round before it was confirmed
    overlapped = [seq for seq, _, end in sends if seq + 1 < len(starts.at) and starts.at[seq + 1] < end]
    assert overlapped, (sends, starts.at)
    # and the rounds did not wait for the 1 s sends (each round waits only for the send before it)
    assert sum(r.upload_s for r in reports) < 1.0, [r.upload_s for r in reports]


def test_a_round_moves_onto_the_snapshot_that_holds_its_last_delta_when_that_lands(
    run_name: str, tmp_path: Path
) -> None:
    """Rounds of about 2 s and a commit every 0.3 s: the delta a round was stacked on lands in a
    snapshot mid-round, and the round moves onto that snapshot by its patch (its progress kept),
    so its own delta is tagged with that version and stacked on nothing; every delta applied."""
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1, dylu=False),
                          commit=CommitConfig(every_updates=1, interval_s=0.3))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        settings = client_config(run_name, tmp_path / "client", coordinator.signing_key, client_id="mover",
                                 max_rounds=4, include_wait_s=10.0, overlap=True, slowdown=30.0)
        with Worker(settings) as worker:
            sent = recorded_sends(worker)
            worker.run(on_round=reports.append)
            moved = worker.rebase.moved
        status = wait_for(lambda: (s := _status(run_name)) and s["deltas"]["applied"] == 4 and s,
                          what="every delta applied")
    assert moved >= 1 and status["deltas"]["rejected"] == 0, (moved, status["deltas"])
    by_seq = {r.seq: r for r in reports}
    moved_rounds = [m for m, prev in zip(sent[1:], sent, strict=False)
                    if m.stacked_on == -1 and m.base_version == by_seq[prev.seq].fate.version]
    assert len(moved_rounds) == moved, [(m.seq, m.base_version, m.stacked_on) for m in sent]
    for message in moved_rounds:  # read by patch: a few bits a parameter, not the snapshot
        assert 0 < by_seq[message.seq].received_bytes < 0.3 * 4 * sum(
            t.numel() for t in worker.replica.trainer.model.parameters())  # type: ignore[union-attr]


def test_a_following_round_moves_onto_the_snapshots_of_other_clients_deltas(
    run_name: str, tmp_path: Path
) -> None:
    """--follow without --overlap: while a slow client's round (12 steps of about 0.2 s) trains, a
    fast client's deltas make new versions, and the round moves onto them by their patches (each
    look, every 0.5 s, finds at most a few versions: the patches are still there), its progress
    kept; its delta is tagged with the version it moved onto, and every delta of both is applied."""
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=12, min_local_steps=1, dylu=False),
                          commit=CommitConfig(every_updates=1, interval_s=0.3))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        key = coordinator.signing_key
        follower_reports: list[RoundReport] = []
        starts = Starts()
        settings = client_config(run_name, tmp_path / "follower", key, client_id="follower", max_rounds=2,
                                 include_wait_s=10.0, follow=True, slowdown=10.0)
        follower = Worker(settings, events=starts)
        with follower:
            sent = recorded_sends(follower)
            thread = threading.Thread(target=lambda: follower.run(on_round=follower_reports.append))
            thread.start()
            busy = Worker(client_config(run_name, tmp_path / "busy", key, client_id="busy", max_rounds=8,
                                        include_wait_s=10.0))
            with busy:
                busy.run()
            thread.join(timeout=60)
            moved = follower.rebase.moved
        status = wait_for(lambda: (s := _status(run_name)) and s["deltas"]["applied"] == 10 and s,
                          what="every delta applied")
    assert not thread.is_alive()
    assert status["deltas"]["rejected"] == 0, status["deltas"]
    assert moved >= 1
    assert len(follower_reports) == 2 and all(r.fate.verdict is not None and r.fate.verdict.applied
                                              for r in follower_reports)
    # a moved round's delta names a newer base than the one its round started from, and says
    # where it began (the coordinator dates its start, and so its speed, by it); others say nothing
    assert any(r.base_version > start.base_version for r, start in zip(follower_reports, starts.starts,
                                                                          strict=False)), (
        [(r.base_version, s.base_version) for r, s in zip(follower_reports, starts.starts, strict=False)])
    assert [m.origin_version for m in sent] == [
        start.base_version if m.base_version > start.base_version else -1
        for m, start in zip(sent, starts.starts, strict=True)]
