"""RabbitMQ restarts under load: everyone reconnects by themselves, nothing is lost or doubled."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import Processes, reachable, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CLIENTS = ("delta", "epsilon")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl for the local broker")
def test_broker_restart_under_load_loses_nothing(procs: Processes, run_name: str, tmp_path: Path) -> None:
    ckpt, state = tmp_path / "ckpt", tmp_path / "state"
    coordinator = procs.start("coordinator", *coordinator_args(run_name, ckpt))
    journals = {cid: tmp_path / f"{cid}.journal" for cid in CLIENTS}
    _, key = run_key(tmp_path)  # the one coordinator_args signs with (beside ckpt)
    clients = [procs.start(cid, *client_args(run_name, cid, state, journals[cid], 45, coordinator_key=key))
               for cid in CLIENTS]
    wait_for(lambda: all(len(read_journal(j)) >= 2 for j in journals.values()), 60, "deltas before")
    before = sum(len(read_journal(j)) for j in journals.values())
    try:
        _rabbitmqctl("stop_app")  # every connection drops; the durable quorum queue stays on disk
        time.sleep(3)
    finally:
        _rabbitmqctl("start_app")
        wait_for(lambda: reachable(5672), 60, "the broker to accept connections again")
    wait_for(lambda: all(c.poll() is not None for c in clients), 90, "clients to finish")
    assert [c.returncode for c in clients] == [0, 0], procs.logs()
    confirmed = {i for j in journals.values() for i in read_journal(j)}
    assert len(confirmed) > before + 2, "no delta was confirmed after the restart"
    wait_for(lambda: confirmed <= settled_ids(ckpt), 60, "the queue to drain")
    assert procs.terminate(coordinator) == 0, procs.logs()
    verdict = judge(confirmed, read_committed(ckpt))
    print(verdict.summary())
    assert verdict.ok, verdict.summary() + "\n" + procs.logs()
    final = status(run_name)
    assert final["coordinator"]["amqp_reconnects"] >= 1
    assert verify_snapshot(run_name) == final["version"]
