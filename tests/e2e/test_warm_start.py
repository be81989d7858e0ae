"""Warm start with real processes: one client trains the run's first steps alone, the other waits
and then joins; the applied log shows the phases in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.faults import client_args, coordinator_args, run_key, status
from harness.oracle import read_committed
from harness.processes import Processes, wait_for

pytestmark = pytest.mark.e2e

WARM_STEPS = 120  # twenty rounds of H = 6: longer than a client takes to start


def test_one_client_warms_the_run_up_alone_then_both_train(
    procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt, state = tmp_path / "ckpt", tmp_path / "state"
    coordinator = procs.start("coordinator", *coordinator_args(run_name, ckpt, "--warm-start-steps",
                                                              str(WARM_STEPS)))
    wait_for(lambda: status(run_name).get("plan", {}).get("mode") == "warm_start", 60, "the warm start plan")
    # --max-seconds only bounds the clients; the test stops them once it has seen what it needs
    _, key = run_key(tmp_path)  # the one coordinator_args signs with (beside ckpt)
    first = procs.start("first", *client_args(run_name, "first", state, tmp_path / "first.journal", 180,
                                              coordinator_key=key))
    wait_for(lambda: status(run_name)["plan"]["warm_client"] == "first", 60, "the first client to hold")
    second = procs.start("second", *client_args(run_name, "second", state, tmp_path / "second.journal", 180,
                                                coordinator_key=key))
    wait_for(lambda: status(run_name)["plan"]["mode"] != "warm_start", 120, "the warm start to end")
    wait_for(lambda: sum(e["id"].startswith("second:") and e["outcome"] == "applied"
                         for e in read_committed(ckpt)) >= 3,
             90, "three applied deltas of the second client")
    assert (procs.terminate(first), procs.terminate(second)) == (0, 0), procs.logs()
    assert procs.terminate(coordinator) == 0, procs.logs()

    entries = [e for e in read_committed(ckpt) if e["outcome"] == "applied"]
    firsts = [i for i, e in enumerate(entries) if e["id"].startswith("first:")]
    seconds = [i for i, e in enumerate(entries) if e["id"].startswith("second:")]
    # the warm-up is the first client's alone: its first twenty rounds before any of the second's
    assert firsts[:WARM_STEPS // 6] == list(range(WARM_STEPS // 6)), entries
    assert seconds and min(seconds) >= WARM_STEPS // 6
    assert "trains the run's first steps alone" in procs.log("second")
    final = status(run_name)
    assert final["deltas"]["rejected_by_reason"].get("warming_up", 0) == 0  # the second one waited
    assert final["progress"]["local_steps"] > WARM_STEPS
    history = [h["loss"] for h in final["eval"]["history"]]
    assert history[-1] < history[0]
