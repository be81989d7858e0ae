"""A volunteer's machine dies (kill -9) mid-round or mid-upload, then comes back with its id."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import Processes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def _seq(delta_id: str) -> int:
    return int(delta_id.rpartition(":")[2])


def test_client_killed_mid_round_resumes_with_its_id_and_nothing_is_lost_or_doubled(
    procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt, state, journal = tmp_path / "ckpt", tmp_path / "state", tmp_path / "gamma.journal"
    coordinator = procs.start("coordinator", *coordinator_args(run_name, ckpt))
    _, key = run_key(tmp_path)  # the one coordinator_args signs with (beside ckpt)
    first = procs.start("gamma-1", *client_args(run_name, "gamma", state, journal, 60, coordinator_key=key))
    wait_for(lambda: len(read_journal(journal)) >= 3, 60, "three confirmed deltas")
    first.kill()  # SIGKILL: mid-round or mid-upload, whatever it was doing
    first.wait()
    before = read_journal(journal)

    second = procs.start("gamma-2", *client_args(run_name, "gamma", state, journal, 10, coordinator_key=key))
    wait_for(lambda: second.poll() is not None, 60, "the restarted client to finish")
    assert second.returncode == 0, procs.logs()
    confirmed = set(read_journal(journal))
    after = confirmed - set(before)
    assert after, "the restarted client confirmed nothing"
    # same id, and its sequence numbers go on: none is used for two different deltas
    assert min(_seq(i) for i in after) > max(_seq(i) for i in before)
    assert all(i.startswith("gamma:") for i in confirmed)

    wait_for(lambda: confirmed <= settled_ids(ckpt), 30, "the queue to drain")
    assert procs.terminate(coordinator) == 0, procs.logs()
    verdict = judge(confirmed, read_committed(ckpt))
    print(verdict.summary())
    assert not verdict.lost and not verdict.duplicated, verdict.summary()
    # the delta in flight at the kill may have been confirmed by the broker but not journaled:
    # applied once, just never written down by the dead client
    assert len(verdict.unexpected) <= 1, verdict.summary()
    assert status(run_name)["deltas"]["rejected"] == 0
    assert verify_snapshot(run_name) == status(run_name)["version"]
