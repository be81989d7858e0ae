"""Each round says where its wall time went (fetch, compute, encode, upload, wait on the coordinator),
in its report and its line, and the next delta carries those timings to the coordinator. The
worker's real code paths with a real LocalTrainer; stand-ins play Redis and RabbitMQ, each taking
a known time."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

from client.report import DeltaFate, RoundReport
from client.uploader import Upload
from shared.protocol import ROUND_TIMINGS, DeltaMessage
from tests.unit.test_worker_pauses import Script, worker

PLAN_S, UPLOAD_S, WAIT_S = 0.05, 0.08, 0.12


def timed_worker(tmp_path: Path, rounds: int) -> tuple[Any, list[DeltaMessage], list[RoundReport]]:
    """A worker whose plan read takes PLAN_S, whose uploads take UPLOAD_S, and whose wait for each
    delta's snapshot takes WAIT_S; its deltas and round reports."""
    w, _, _, sent, _ = worker(tmp_path, Script(None), steps=2, max_rounds=rounds)
    w.config = dataclasses.replace(w.config, include_wait_s=5.0)
    plan = w.fetcher.wait_for_plan(0.0)
    versions = itertools.count(1)  # the staleness each round reads

    def slow_plan(poll_s: float) -> Any:
        time.sleep(PLAN_S)
        return plan

    def slow_wait(**kwargs: Any) -> DeltaFate:
        time.sleep(WAIT_S)
        return DeltaFate()

    def slow_send(message: DeltaMessage, give_up: Any) -> Upload:
        sent.messages.append(message)
        time.sleep(UPLOAD_S)
        return Upload(confirmed=True, body_bytes=1000, upload_s=UPLOAD_S)

    w.fetcher.wait_for_plan, w.waits.until_included = slow_plan, slow_wait
    w.fetcher.current_version = lambda max_age_s=0.0: next(versions)
    w.waits.for_newer_base = lambda **kwargs: None  # a newer version is there each time
    w.uploader.send = slow_send
    reports: list[RoundReport] = []
    w.run(on_round=reports.append)
    return w, sent.messages, reports


def test_each_round_reports_where_its_time_went(tmp_path: Path) -> None:
    _, _, (report,) = timed_worker(tmp_path, rounds=1)
    assert PLAN_S <= report.fetch_s < PLAN_S + 0.5
    assert 0 < report.encode_s < 1.0
    assert report.upload_s == UPLOAD_S
    assert WAIT_S <= report.wait_s < WAIT_S + 0.5
    assert f"fetch={report.fetch_s:.2f}s encode={report.encode_s:.2f}s upload=0.08s " in report.line()
    assert f"wait={report.wait_s:.2f}s  staleness=" in report.line()
    assert report.timings() == {"fetch_s": report.fetch_s, "encode_s": report.encode_s,
                                "upload_s": UPLOAD_S, "wait_s": report.wait_s}


def test_each_delta_carries_the_previous_rounds_timings_over_the_wire(tmp_path: Path) -> None:
    _, messages, reports = timed_worker(tmp_path, rounds=3)
    assert [m.previous_timings for m in messages] == [{}, reports[0].timings(), reports[1].timings()]
    decoded = DeltaMessage.decode(messages[1].encode())
    assert decoded.previous_timings == reports[0].timings() and list(decoded.previous_timings) == list(
        ROUND_TIMINGS)
    assert DeltaMessage.decode(messages[0].encode()).previous_timings == {}  # a first round says nothing
