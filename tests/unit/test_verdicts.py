"""The verdict on a delta, without servers: its wire form and limits, which outcomes the coordinator
tells (only under a checked sender's name), and how the client's round line says it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from client.report import DeltaFate, RoundReport, RunSummary
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.verdicts import MAX_PENDING, VerdictBoard
from shared.errors import ProtocolError
from shared.verdict import (
    MAX_DETAIL_CHARS,
    MAX_ENTRIES_READ,
    MAX_VERDICT_BYTES,
    VERDICT_FIELD,
    VERDICT_STREAM_LEN,
    Verdict,
    parse_entries,
)


def test_a_verdict_travels_whole_and_its_detail_is_cut() -> None:
    verdict = Verdict(run_id="rid-1", seq=7, applied=False, reason="stale", detail="x" * 1000, at=12.5)
    back = Verdict.decode(verdict.encode())
    assert (back.run_id, back.seq, back.applied, back.reason, back.at) == ("rid-1", 7, False, "stale", 12.5)
    assert back.detail == "x" * MAX_DETAIL_CHARS
    assert len(verdict.encode()) <= MAX_VERDICT_BYTES
    newer = json.loads(verdict.encode()) | {"credit": 3}  # a newer coordinator's extra field
    assert Verdict.decode(json.dumps(newer).encode()).seq == 7


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[1, 2]", b'{"run_id": "r"}', b"{" + b" " * MAX_VERDICT_BYTES + b"}",
    json.dumps({"run_id": "r", "seq": True, "applied": True, "reason": "", "detail": "", "at": 1}).encode(),
    json.dumps({"run_id": "r", "seq": -1, "applied": True, "reason": "", "detail": "", "at": 1}).encode(),
    json.dumps({"run_id": "", "seq": 1, "applied": True, "reason": "", "detail": "", "at": 1}).encode(),
    json.dumps({"run_id": "r", "seq": 1, "applied": "yes", "reason": "", "detail": "", "at": 1}).encode(),
    json.dumps({"run_id": "r", "seq": 1, "applied": True, "reason": "", "detail": "", "at": 1,
                "version": -2}).encode(),
    json.dumps({"run_id": "r", "seq": 1, "applied": True, "reason": "", "detail": "", "at": 1,
                "version": 3.5}).encode(),
    json.dumps({"run_id": "r", "seq": 1, "applied": True, "reason": "", "detail": "", "at": 1,
                "cycle_open": 1}).encode(),
])
def test_anything_else_is_refused_as_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Verdict.decode(raw)


def test_an_applied_verdict_names_its_snapshot_and_its_cycle() -> None:
    back = Verdict.decode(Verdict("rid-1", 7, True, at=1.0, version=12, cycle_open=True).encode())
    assert (back.version, back.cycle_open) == (12, True)
    older = {"run_id": "r", "seq": 1, "applied": False, "reason": "stale", "detail": "", "at": 1}
    assert Verdict.decode(json.dumps(older).encode()).version == -1  # a rejection names none


def test_stream_entries_from_a_server_a_client_must_not_trust_yield_only_verdicts() -> None:
    good = Verdict("rid-1", 7, True, at=1.0, version=3)
    entries = [
        (b"1-0", {VERDICT_FIELD: good.encode()}),
        (b"2-0", {VERDICT_FIELD: b"not json"}),  # skipped, but read past
        (b"3-0", {b"other": good.encode()}),
        (b"4-0", "not a dict"),
        ("5-0", {VERDICT_FIELD: 12}),
        ["too", "many", "items"],
        (b"9" * 100, {VERDICT_FIELD: good.encode()}),  # an id too long to be one
        (b"6-0", {VERDICT_FIELD: replace(good, seq=8).encode()}),
    ]
    verdicts, last = parse_entries(entries)
    assert [v.seq for v in verdicts] == [7, 8] and last == b"6-0"
    assert parse_entries(None) == ([], None) and parse_entries(b"junk") == ([], None)
    many = [(f"{i}-0".encode(), {VERDICT_FIELD: good.encode()}) for i in range(MAX_ENTRIES_READ * 10)]
    assert len(parse_entries(many)[0]) == MAX_ENTRIES_READ


def test_the_board_keeps_each_clients_verdicts_under_a_checked_name_only() -> None:
    board = VerdictBoard("rid-1")
    board.record(Outcome(OutcomeKind.APPLIED, client_id="alice", seq=3), now=1.0)
    board.record(Outcome.rejected("stale", "base 1 is 40 deltas old", "bob", 5), now=2.0)
    board.record(Outcome.rejected("already_sent", "one per base", "alice", 4), now=3.0)  # alice's newest
    for outcome in (Outcome(OutcomeKind.DUPLICATE, "duplicate", "", "carol", 1),  # settled before
                    Outcome.rejected("identity_mismatch", "sent by bob", "carol", 9),  # not carol's doing
                    Outcome.rejected("wrong_run", "another run", "carol", 9),
                    Outcome.rejected("undecodable", "garbage")):  # no client to tell
        board.record(outcome, now=4.0)
    assert sorted(board.pending) == ["alice", "bob"]
    assert board.pending["alice"] == [Verdict("rid-1", 3, True, at=1.0),  # both of alice's, in order
                                      Verdict("rid-1", 4, False, "already_sent", "one per base", 3.0)]
    assert [v.describe() for v in board.pending["bob"]] == ["rejected: stale (base 1 is 40 deltas old)"]


def test_the_board_holds_a_bounded_number_of_clients() -> None:
    board = VerdictBoard("rid-1")
    for i in range(MAX_PENDING + 10):
        board.record(Outcome(OutcomeKind.APPLIED, client_id=f"c{i}", seq=0), now=0.0)
    board.record(Outcome(OutcomeKind.APPLIED, client_id="c0", seq=1), now=0.0)  # a waiting one: kept
    assert len(board.pending) == MAX_PENDING and [v.seq for v in board.pending["c0"]] == [0, 1]
    for seq in range(2, 2 + 2 * VERDICT_STREAM_LEN):  # and its last few only
        board.record(Outcome(OutcomeKind.APPLIED, client_id="c0", seq=seq), now=0.0)
    assert len(board.pending["c0"]) == VERDICT_STREAM_LEN and board.pending["c0"][-1].seq == seq


@pytest.mark.parametrize(("fate", "said"), [
    (DeltaFate(Verdict("r", 1, True), 12), "applied v=12"),
    (DeltaFate(Verdict("r", 1, True), None), "applied, not yet in a snapshot"),
    (DeltaFate(Verdict("r", 1, False, "stale", "too old"), None), "rejected: stale (too old)"),
    (DeltaFate(None, 12), "in v=12"),  # a coordinator that writes no verdicts
    (DeltaFate(), "outcome=?"),
])
def test_the_round_line_ends_in_the_verdict(fate: DeltaFate, said: str) -> None:
    report = RoundReport(round=2, seq=1, base_version=11, planned_steps=5, steps=5, train_loss=2.0,
                         compute_s=1.0, tokens=100, sent_bytes=10**6, sent=True, upload_s=0.1,
                         staleness=1, fate=fate)
    assert report.line().startswith("round 2  v=11  H=5  ")
    assert report.line().endswith(f"staleness=1  {said}")


def test_the_summary_counts_applied_and_rejected_deltas() -> None:
    summary = RunSummary("alice", "rid", rounds=3, deltas_sent=3, next_seq=3, stopped_by="max_rounds",
                         applied=2, rejected=1)
    assert summary.line() == ("stopped (max_rounds): 3 rounds, 3 deltas sent as client alice, next seq 3; "
                              "2 applied, 1 rejected")
