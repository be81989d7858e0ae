"""kill -9 of the coordinator at each dangerous point of the commit cycle loses nothing and applies
nothing twice: real coordinator and client processes, checked by the journal oracle (harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.applied_log import read_applied_log
from coordinator.faults import EXIT_CODE
from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import Processes, wait_for
from tests.faults.journals import confirmed_ids

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CLIENTS = ("alpha", "beta")
CLIENT_SECONDS = 16

# The pass of each point that crashes: late enough that both clients have deltas in flight
# (the initial commit passes the checkpoint and snapshot points once before any delta).
CRASH_AT = {
    "after_apply": 4,
    "mid_checkpoint": 5,
    "after_checkpoint": 5,
    "after_ack": 4,
    "mid_snapshot": 5,
}


@pytest.mark.parametrize("point", list(CRASH_AT))
def test_kill_at_crash_point_loses_nothing_and_applies_nothing_twice(
    point: str, procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    serve = coordinator_args(run_name, ckpt)
    first = procs.start("coordinator-1", *serve, "--crash-at", f"{point}:{CRASH_AT[point]}")
    journals = {cid: tmp_path / f"{cid}.journal" for cid in CLIENTS}
    state = tmp_path / "state"
    _, key = run_key(tmp_path)  # the one coordinator_args signs with (beside ckpt)
    clients = [procs.start(cid, *client_args(run_name, cid, state, journals[cid], CLIENT_SECONDS,
                                             coordinator_key=key))
               for cid in CLIENTS]

    # the crash: exit code 137, nothing cleaned up, deltas in flight
    wait_for(lambda: first.poll() is not None, 45, f"the crash at {point}")
    assert first.returncode == EXIT_CODE, procs.logs()
    assert f"crash point {point} reached" in procs.log("coordinator-1")
    confirmed_at_crash = sum(len(read_journal(j)) for j in journals.values())

    # resume without a crash point; the clients carry on without a restart
    second = procs.start("coordinator-2", *serve, "--resume")
    wait_for(lambda: all(c.poll() is not None for c in clients), CLIENT_SECONDS + 40, "clients to finish")
    assert [c.returncode for c in clients] == [0, 0], procs.logs()
    confirmed = confirmed_ids(journals)
    assert len(confirmed) > confirmed_at_crash, "no delta was confirmed after the crash"
    # every confirmed delta reaches a commit before the clean stop (else it would only be queued)
    wait_for(lambda: confirmed <= settled_ids(ckpt), 30, "the queue to drain")
    assert procs.terminate(second) == 0, procs.logs()

    verdict = judge(confirmed, read_committed(ckpt))
    print(f"{point}: {verdict.summary()}")
    assert verdict.ok, verdict.summary() + "\n" + procs.logs()
    # after a clean stop the log holds exactly what the last checkpoint covers
    assert read_committed(ckpt) == read_applied_log(ckpt)
    assert not list(ckpt.glob(".*.tmp")), "a crashed checkpoint write left its temp file behind"
    final = status(run_name)
    assert final["coordinator"]["state"] == "stopped"
    assert final["deltas"]["applied"] == sum(verdict.applied.values())
    versions = [h["version"] for h in final["eval"]["history"]]
    assert all(a < b for a, b in zip(versions, versions[1:], strict=False)), versions
    assert verify_snapshot(run_name) == final["version"]
    assert "Traceback" not in procs.log("coordinator-2") + "".join(procs.log(c) for c in CLIENTS)
