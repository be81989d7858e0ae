"""kill -9 of the coordinator while real clients send their deltas in parts loses nothing and
applies nothing twice. Two moments matter for parts (see coordinator/parts.py):

* ``part_spooled``: a part is on disk but not yet acked; the broker redelivers it after the restart
  and the spool recognises it.
* ``after_checkpoint``: a commit that settles an assembled delta has landed, but its spool entry is
  still there; the restarted coordinator finds it whole, hands it in again, and the (client id, seq)
  de-duplication drops it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.faults import EXIT_CODE
from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import Processes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CLIENTS = ("gamma", "kappa")
CLIENT_SECONDS = 22
PART_BYTES = "65536"  # the tiny model's fp16 delta (~0.9 MB) goes as ~14 parts
CRASH_AT = {"part_spooled": 40, "after_checkpoint": 5}


@pytest.mark.parametrize("point", list(CRASH_AT))
def test_kill_while_deltas_arrive_in_parts_loses_nothing(
    point: str, procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt, state = tmp_path / "ckpt", tmp_path / "state"
    serve = coordinator_args(run_name, ckpt)
    first = procs.start("coordinator-1", *serve, "--crash-at", f"{point}:{CRASH_AT[point]}")
    journals = {cid: tmp_path / f"{cid}.journal" for cid in CLIENTS}
    clients = [
        procs.start(cid, *client_args(run_name, cid, state, journals[cid], CLIENT_SECONDS,
                                      coordinator_key=run_key(tmp_path)[1]),  # coordinator_args' key
                    "--part-bytes", PART_BYTES)
        for cid in CLIENTS
    ]
    wait_for(lambda: first.poll() is not None, 60, f"the crash at {point}")
    assert first.returncode == EXIT_CODE, procs.logs()
    confirmed_at_crash = sum(len(read_journal(j)) for j in journals.values())

    second = procs.start("coordinator-2", *serve, "--resume")
    wait_for(lambda: all(c.poll() is not None for c in clients), CLIENT_SECONDS + 60, "clients to finish")
    assert [c.returncode for c in clients] == [0, 0], procs.logs()
    confirmed = {i for j in journals.values() for i in read_journal(j)}
    assert len(confirmed) > confirmed_at_crash, "no delta was confirmed after the crash"
    wait_for(lambda: confirmed <= settled_ids(ckpt), 40, "the queue to drain")
    wait_for(lambda: not list((ckpt / "parts").iterdir()), 20, "the spool to empty")
    assert procs.terminate(second) == 0, procs.logs()

    verdict = judge(confirmed, read_committed(ckpt))
    print(f"{point}: {verdict.summary()}")
    assert verdict.ok, verdict.summary() + "\n" + procs.logs()
    assert not verdict.rejected, verdict.rejected
    final = status(run_name)
    assert final["parts"]["assembled"] >= 1 and final["parts"]["incomplete"] == 0
    assert final["deltas"]["applied"] == sum(verdict.applied.values())
    assert verify_snapshot(run_name) == final["version"]
    assert all("parts" in procs.log(c) and "sending it in" in procs.log(c) for c in CLIENTS)
    assert "Traceback" not in procs.log("coordinator-2") + "".join(procs.log(c) for c in CLIENTS)
