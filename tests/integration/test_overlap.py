"""``--overlap`` against a real coordinator: a client starts each round as soon as its delta is
confirmed, from the newest snapshot moved by its own in-flight delta, says which delta it stacked
on, and the coordinator takes every one of them (none refused ``already_sent``); each round's
line still ends in its verdict, one round late."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


def test_stacked_rounds_are_all_applied_and_each_says_its_verdict(run_name: str, tmp_path: Path) -> None:
    # commits at most every 0.5 s: a 3-step round ends before its last delta is in a snapshot
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1, dylu=False),
                          commit=CommitConfig(every_updates=4, interval_s=0.5))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        reports: list[RoundReport] = []
        sent: list[DeltaMessage] = []
        settings = client_config(run_name, tmp_path / "client", coordinator.signing_key, client_id="eager",
                                 max_rounds=ROUNDS, include_wait_s=10.0, overlap=True)
        with Worker(settings) as worker:
            send = worker.uploader.send

            def recording(message: DeltaMessage, **kwargs: Any) -> Any:
                sent.append(message)
                return send(message, **kwargs)

            worker.uploader.send = recording  # type: ignore[method-assign]
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
