"""This machine's lifetime contribution: what each round adds, contribution.json in the state dir
(written whole, shared by the processes of one state dir, an unreadable one set aside), and
``asyncloco-client stats`` (text and --json, a bad file in one line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from client import cli
from client.contribution import FILE_NAME, MAX_RUNS_KEPT, Contribution, ContributionBook, Tally
from client.report import DeltaFate, RoundReport
from shared.verdict import Verdict

T0 = 1_717_400_000.0  # Unix seconds


def report(*, run_id: str = "rid-1", run: str = "demo", verdict: Verdict | None = None, sent: bool = True,
           steps: int = 10, tokens: int = 1000, compute_s: float = 90.0, sent_bytes: int = 2_000_000,
           received_bytes: int = 0, seq: int = 0) -> RoundReport:
    return RoundReport(round=1, seq=seq, base_version=3, planned_steps=steps, steps=steps, train_loss=2.5,
                       compute_s=compute_s, tokens=tokens, sent_bytes=sent_bytes, sent=sent, upload_s=0.1,
                       staleness=0, fate=DeltaFate(verdict, 4 if verdict else None), run=run, run_id=run_id,
                       received_bytes=received_bytes)


APPLIED = Verdict("rid-1", 0, True)


def stale(seq: int = 0) -> Verdict:
    return Verdict("rid-1", seq, False, "stale", "base 3 is 40 deltas old")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 60.0
        return self.now


def test_a_tally_counts_each_fate() -> None:
    tally = Tally()
    for r in (report(verdict=APPLIED, received_bytes=5_000_000), report(verdict=stale()),
              report(verdict=stale()), report(verdict=Verdict("rid-1", 0, False, "already_sent")),
              report(verdict=None), report(sent=False, verdict=APPLIED)):
        tally = tally.plus(r)
    assert (tally.rounds, tally.deltas_sent, tally.applied, tally.unjudged) == (6, 5, 1, 1)
    assert tally.rejected == {"stale": 2, "already_sent": 1} and tally.rejected_total == 3
    assert (tally.local_steps, tally.tokens, tally.compute_s) == (60, 6000, 540.0)
    assert (tally.bytes_up, tally.bytes_down) == (10_000_000, 5_000_000)  # an unsent delta sent nothing
    assert tally.describe() == [
        "rounds 6, deltas sent 5: applied 1, rejected 3 (already_sent 1, stale 2), no verdict 1",
        "local steps 60, tokens 6.0k, compute 9.0 min, sent 10.0MB, received 5.0MB",
    ]


def test_the_book_keeps_the_total_and_each_run_across_processes(tmp_path: Path) -> None:
    clock = Clock()
    first, second = ContributionBook(tmp_path, clock=clock), ContributionBook(tmp_path, clock=clock)
    first.record(report(verdict=APPLIED))
    second.record(report(run_id="rid-2", run="other", verdict=stale()))  # another process, same state dir
    latest = first.record(report(verdict=APPLIED, received_bytes=123))
    assert latest == ContributionBook(tmp_path).read()  # what it returns is what is on disk
    assert latest.total.rounds == 3 and latest.total.applied == 2 and latest.total.rejected == {"stale": 1}
    assert (latest.first_seen, latest.last_seen) == (T0 + 60, T0 + 180)
    by_id = {r.run_id: r for r in latest.runs}
    assert by_id["rid-1"].run == "demo" and by_id["rid-1"].tally.rounds == 2
    assert by_id["rid-1"].tally.bytes_down == 123
    assert (by_id["rid-1"].first_seen, by_id["rid-1"].last_seen) == (T0 + 60, T0 + 180)
    assert by_id["rid-2"].tally.rejected == {"stale": 1}
    assert [r.run_id for r in latest.runs] == ["rid-2", "rid-1"]  # the most recently seen last
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [FILE_NAME, FILE_NAME + ".lock"]  # written via a temp file, none left behind


def test_the_document_reads_back_as_written(tmp_path: Path) -> None:
    book = ContributionBook(tmp_path, clock=Clock())
    book.record(report(verdict=stale()))
    written = book.record(report(verdict=APPLIED, run_id="rid-9"))
    doc = json.loads((tmp_path / FILE_NAME).read_text())
    assert doc["format"] == 1 and doc["total"]["rejected"] == {"stale": 1} and set(doc["runs"]) == {
        "rid-1", "rid-9"}
    assert Contribution.from_json(doc) == written


def test_only_the_newest_runs_are_listed_but_the_total_keeps_them_all(tmp_path: Path) -> None:
    contribution = Contribution()
    for n in range(MAX_RUNS_KEPT + 5):
        contribution = contribution.plus(report(run_id=f"rid-{n}", verdict=APPLIED), T0 + n)
    assert len(contribution.runs) == MAX_RUNS_KEPT
    assert contribution.runs[0].run_id == "rid-5" and contribution.total.rounds == MAX_RUNS_KEPT + 5


def test_an_unreadable_record_is_set_aside_and_counting_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        fresh = ContributionBook(tmp_path).record(report(verdict=APPLIED))
    assert fresh.total.rounds == 1
    assert (tmp_path / (FILE_NAME + ".bad")).read_text() == "{not json"
    assert "setting it aside" in caplog.text


def test_a_record_that_cannot_be_written_never_stops_the_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a state dir below a file cannot be created
    book = ContributionBook(blocker / "state", clock=Clock())
    with caplog.at_level(logging.WARNING):
        book.record(report(verdict=APPLIED))
        kept = book.record(report(verdict=APPLIED))
    assert kept.total.rounds == 2  # counted in memory
    assert caplog.text.count("cannot record this machine's contribution") == 1  # said once


# --- asyncloco-client stats -------------------------------------------------------------------------


def stats(*args: str, **kwargs: Any) -> Result:
    return CliRunner().invoke(cli.main, ["stats", *args], prog_name="asyncloco-client", **kwargs)


def test_stats_with_nothing_recorded(tmp_path: Path) -> None:
    result = stats("--state-dir", str(tmp_path / "never"))
    assert result.exit_code == 0 and result.output == "no rounds recorded yet on this machine\n"


def test_stats_prints_the_total_then_each_run(tmp_path: Path) -> None:
    book = ContributionBook(tmp_path, clock=Clock())
    book.record(report(verdict=APPLIED, compute_s=3600.0))
    book.record(report(run_id="rid-2", run="other", verdict=stale()))
    result = stats(env={"ASYNCLOCO_STATE_DIR": str(tmp_path)})  # the envvar, as join's
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("this machine, ") and lines[0].endswith(", all runs:")
    assert lines[1] == "  rounds 2, deltas sent 2: applied 1, rejected 1 (stale 1)"
    assert lines[2] == "  local steps 20, tokens 2.0k, compute 1.02 h, sent 4.0MB, received 0B"
    assert lines[3].startswith("run 'other' (id rid-2), ")  # the newest first
    assert lines[6].startswith("run 'demo' (id rid-1), ") and len(lines) == 9


def test_stats_json_is_the_record_with_its_state_dir(tmp_path: Path) -> None:
    ContributionBook(tmp_path, clock=Clock()).record(report(verdict=stale()))
    result = stats("--state-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["state_dir"] == str(tmp_path)
    assert doc["total"]["rejected"] == {"stale": 1} and doc["total"]["compute_s"] == 90.0
    assert doc["runs"]["rid-1"]["run"] == "demo" and doc["first_seen"] == T0 + 60


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "runs": {}, "total": {"rounds": -1}}',
                                     '{"format": 7, "runs": {}}'])
def test_stats_on_a_bad_record_is_one_line(tmp_path: Path, content: str) -> None:
    (tmp_path / FILE_NAME).write_text(content)
    result = stats("--state-dir", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {tmp_path / FILE_NAME} is unreadable (")
    assert "Traceback" not in result.output
