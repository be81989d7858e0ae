"""End to end with real processes: a coordinator and two clients of different speeds train the tiny
model on the real servers; the coordinator is killed (-9) mid-run and resumed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import redis

from harness.faults import run_key
from harness.processes import REDIS_URL, Processes, wait_for
from shared.keys import RunKeys

pytestmark = pytest.mark.e2e

TASK = ["--model-size", "tiny", "--task-setting", "max_corpus_bytes=3000000",
        "--task-setting", "eval_sequences=32"]


def _status(run: str) -> dict:
    raw = redis.Redis.from_url(REDIS_URL).get(RunKeys(run).status)
    return json.loads(raw) if raw else {}


def _slow_runs_shorter(run: str) -> bool:
    assigned = {c["client_id"]: c.get("assigned_steps") for c in _status(run).get("clients", [])}
    fast, slow = assigned.get("fast"), assigned.get("slow")
    return fast is not None and slow is not None and slow < 0.75 * fast


def test_two_clients_train_the_model_through_a_coordinator_crash(
    procs: Processes, run_name: str, tmp_path: Path
) -> None:
    key_file, coordinator_key = run_key(tmp_path)
    serve = ["-m", "coordinator.cli", "serve", "--run", run_name, *TASK, "--threads", "1",
             "--signing-key", str(key_file),
             "--checkpoint-dir", str(tmp_path / "ckpt"), "--local-steps", "20", "--min-local-steps", "2",
             "--eval-interval", "3", "--max-seconds", "150", "--auth", "open"]
    coordinator = procs.start("coordinator", *serve)
    wait_for(lambda: _status(run_name).get("eval", {}).get("latest"), 60, "the coordinator's first snapshot")
    start_loss = _status(run_name)["eval"]["history"][0]["loss"]
    for client_id, slowdown in (("fast", "1"), ("slow", "4")):
        procs.start(client_id, "-m", "client.cli", "join", "--run", run_name, "--client-id", client_id,
                    "--slowdown", slowdown, "--threads", "1", "--device", "cpu",
                    "--state-dir", str(tmp_path / "state"), "--max-seconds", "70",
                    "--coordinator-key", coordinator_key)
    wait_for(lambda: all(c["updates"] >= 2 for c in _status(run_name).get("clients", [{}, {}]))
          and len(_status(run_name)["clients"]) == 2, 60, "both clients' updates")
    # Dynamic Local Updates: once the coordinator measured both speeds, its plan gives the slow
    # client shorter rounds (asked of the plan, not of rounds run: a client's first rounds run
    # H before it is measured, and its last is cut short by --max-seconds)
    wait_for(lambda: _slow_runs_shorter(run_name), 30, "the plan to give the slow client shorter rounds")

    # kill -9 mid-run, then resume: versions keep rising, clients carry on without a restart
    version_before = _status(run_name)["version"]
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    time.sleep(2)
    procs.start("coordinator", *serve, "--resume")
    resumed = wait_for(lambda: (s := _status(run_name)).get("coordinator", {}).get("pid") != coordinator.pid
                    and s, 60, "the resumed coordinator")
    assert resumed["version"] > version_before
    updates_at_resume = {c["client_id"]: c["updates"] for c in resumed["clients"]}

    client_procs = procs.procs[1:3]
    wait_for(lambda: all(p.poll() is not None for p in client_procs), 90, "clients to finish")
    assert [p.returncode for p in client_procs] == [0, 0], procs.log("fast") + procs.log("slow")
    procs.stop_all()  # SIGTERM: the coordinator commits and evaluates the final model

    final = _status(run_name)
    assert final["coordinator"]["state"] == "stopped"
    clients = {c["client_id"]: c for c in final["clients"]}
    for cid in ("fast", "slow"):
        assert clients[cid]["updates"] > updates_at_resume.get(cid, 0), f"{cid} made no progress after resume"
    # training worked: eval loss clearly below its start (≈5.5 nats/byte)
    end_loss = final["eval"]["history"][-1]["loss"]
    assert end_loss < start_loss - 1.5, (start_loss, end_loss)
    versions = [h["version"] for h in final["eval"]["history"]]
    assert versions == sorted(versions)
    assert final["deltas"]["rejected_by_reason"].get("wrong_run", 0) == 0
    assert "Traceback" not in procs.log("coordinator") + procs.log("fast") + procs.log("slow")
