"""A volunteer learns what became of each delta: applied (and in which version), or rejected and why,
from a real coordinator serving on the real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from client.report import RoundReport
from client.worker import Worker
from coordinator.intake import IntakeConfig
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.registry import PlanConfig
from coordinator.verdicts import VerdictBoard
from harness.processes import wait_for
from shared.keys import RunKeys
from shared.verdict import VERDICT_STREAM_LEN, VERDICT_TTL_S, parse_entries
from tests.integration.test_coordinator_intake import _status
from tests.integration.test_signed_snapshots import client_config
from tests.services import serving, small_config

pytestmark = pytest.mark.integration


def _rounds(run: str, tmp_path: Path, max_local_steps: int) -> tuple[list[RoundReport], str]:
    """Two rounds of one client against a coordinator that takes at most ``max_local_steps`` per
    delta; the round reports, and the summary line."""
    config = small_config(run, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1),
                          intake=IntakeConfig(max_local_steps=max_local_steps))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        settings = client_config(run, tmp_path / "client", coordinator.signing_key, client_id="judged",
                                 max_rounds=2, include_wait_s=10.0)
        with Worker(settings) as worker:
            summary = worker.run(on_round=reports.append)
    return reports, summary.line()


def test_every_round_says_its_delta_was_applied_and_in_which_version(
    run_name: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    reports, summary = _rounds(run_name, tmp_path, max_local_steps=1_000)
    assert [r.fate.verdict.applied for r in reports if r.fate.verdict] == [True, True], reports
    for report in reports:
        assert report.fate.version is not None and report.fate.version > report.base_version
        assert report.line().endswith(f"  applied v={report.fate.version}")
    assert summary.endswith("; 2 applied, 0 rejected")
    # what a volunteer's user may read: one entry per verdict, each naming its snapshot
    entries = redis_client.xrange(RunKeys(run_name).verdicts("judged"))
    verdicts, _ = parse_entries(entries)
    assert [(v.seq, v.applied, v.version) for v in verdicts] == [
        (r.seq, True, r.fate.version) for r in reports]


def test_the_coordinators_status_shows_each_clients_reported_round_timings(
    run_name: str, tmp_path: Path
) -> None:
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        settings = client_config(run_name, tmp_path / "client", coordinator.signing_key, client_id="timed",
                                 max_rounds=3, include_wait_s=10.0)
        with Worker(settings) as worker:
            worker.run(on_round=reports.append)
        # the last applied delta (round 3's) said what round 2 took; status shows it as reported
        status = wait_for(lambda: (s := _status(run_name)) and s["deltas"]["applied"] == 3 and s,
                          what="the third delta applied")
    (client,) = status["clients"]
    assert client["reported_timings"] == pytest.approx(reports[1].timings(), abs=1e-6)
    assert set(client["reported_timings"]) == {"fetch_s", "encode_s", "upload_s", "wait_s"}
    assert reports[1].wait_s > 0 and reports[1].upload_s > 0


def test_a_rejected_delta_says_why_at_once(run_name: str, tmp_path: Path) -> None:
    reports, summary = _rounds(run_name, tmp_path, max_local_steps=1)  # 3 steps a round: too many
    assert len(reports) == 2
    for report in reports:
        verdict = report.fate.verdict
        assert verdict is not None and not verdict.applied and verdict.reason == "bad_steps"
        assert report.line().endswith("  rejected: bad_steps (local_steps 3 out of range)"), report.line()
        assert report.fate.version is None  # no snapshot holds it
    assert summary.endswith("; 0 applied, 2 rejected")
    assert json.loads(reports[0].fate.verdict.encode())["reason"] == "bad_steps"  # type: ignore[union-attr]


def test_a_rejection_is_told_at_once_and_an_applied_delta_with_the_snapshot_that_holds_it(
    run_name: str, redis_client: redis.Redis
) -> None:
    keys, board = RunKeys(run_name), VerdictBoard("rid-1")
    board.record(Outcome(OutcomeKind.APPLIED, client_id="alice", seq=3), now=1.0)
    board.record(Outcome.rejected("stale", "too old", "bob", 5), now=2.0)
    board.publish(redis_client, keys)  # a housekeeping pass: no snapshot yet
    assert parse_entries(redis_client.xrange(keys.verdicts("bob")))[0][0].reason == "stale"
    assert redis_client.xrange(keys.verdicts("alice")) == [] and list(board.pending) == ["alice"]
    board.publish(redis_client, keys, version=9, cycle_open=True)  # with snapshot 9
    (told,), _ = parse_entries(redis_client.xrange(keys.verdicts("alice")))
    assert (told.seq, told.applied, told.version, told.cycle_open) == (3, True, 9, True)
    assert board.pending == {} and 0 < redis_client.ttl(keys.verdicts("alice")) <= VERDICT_TTL_S
    for seq in range(4, 4 + 2 * VERDICT_STREAM_LEN):  # a long-lived client's stream stays short
        board.record(Outcome(OutcomeKind.APPLIED, client_id="alice", seq=seq), now=3.0)
        board.publish(redis_client, keys, version=seq + 6)
    assert redis_client.xlen(keys.verdicts("alice")) == VERDICT_STREAM_LEN
