"""RabbitMQ killed with kill -9 under load: the durable quorum queue comes back with every confirmed
delta, the coordinator and the clients reconnect by themselves, nothing is lost or doubled.

The broker killed is a private node this test starts on a spare port (tests/private_broker.py),
never the shared one on 5672: a test ends only the processes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import Processes, wait_for
from shared.keys import RunKeys
from tests.faults.journals import confirmed_ids
from tests.private_broker import PrivateBroker, rabbitmq_tool

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CLIENTS = ("zeta", "eta")
CLIENT_SECONDS = 240  # a safety bound: the test stops the clients with SIGTERM well before


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A RabbitMQ node of this test's own; stopped and its state removed whatever happens."""
    if rabbitmq_tool("rabbitmq-server") is None or rabbitmq_tool("rabbitmqctl") is None:
        pytest.skip("needs rabbitmq-server and rabbitmqctl installed to run a private RabbitMQ node")
    broker = PrivateBroker(tmp_path / "rabbitmq")
    try:
        broker.start()
        yield broker
    finally:
        try:
            broker.stop()
        finally:
            shutil.rmtree(broker.root, ignore_errors=True)


# private_broker comes before procs, so its teardown runs after the processes are stopped
def test_broker_killed_under_load_loses_nothing(
    private_broker: PrivateBroker, procs: Processes, run_name: str, tmp_path: Path
) -> None:
    broker = private_broker
    ckpt, state = tmp_path / "ckpt", tmp_path / "state"
    # prefetch 2: once the coordinator holds two deliveries, further deltas wait in the queue itself
    coordinator = procs.start("coordinator", *coordinator_args(
        run_name, ckpt, "--amqp", broker.url, "--prefetch", "2", "--commit-every", "1"))
    journals = {cid: tmp_path / f"{cid}.journal" for cid in CLIENTS}
    _, key = run_key(tmp_path)  # the one coordinator_args signs with (beside ckpt)
    # --include-wait 0: clients go on training on the base they have while the coordinator is frozen,
    # so deltas pile up (the repeats on one base are refused already_sent once it thaws)
    clients = [procs.start(cid, *client_args(run_name, cid, state, journals[cid], CLIENT_SECONDS,
                                             coordinator_key=key),
                           "--amqp", broker.url, "--include-wait", "0") for cid in CLIENTS]
    wait_for(lambda: all(len(read_journal(j)) >= 2 for j in journals.values()), 90, "deltas before")

    # Freeze the coordinator so that confirmed deltas pile up in the queue, then kill the broker:
    # what the queue held at the kill must come back from its disk.
    # The VM's pid is asked for first (a rabbitmqctl call of seconds), so ``before`` is taken right
    # before the kill.
    delta_queue, vm = RunKeys(run_name).delta_queue, broker.vm_pid()
    os.kill(coordinator.pid, signal.SIGSTOP)
    try:
        waiting = wait_for(lambda: (n := broker.ready_messages(delta_queue)) >= 2 and n, 60,
                           "confirmed deltas to wait in the queue")
        before = confirmed_ids(journals)
        killed = broker.kill_vm(vm)
    finally:
        os.kill(coordinator.pid, signal.SIGCONT)
    down_at = time.monotonic()
    broker.start()  # same node name and data directory: the durable quorum queue comes back
    restart_s = time.monotonic() - down_at
    assert broker.vm_pid() != killed

    # Each client has at most one delta in flight, which the old broker may have confirmed just
    # before the kill: two more per client means the restarted broker confirmed some. Then stop
    # the clients with SIGTERM (they send the round in hand and exit).
    wait_for(lambda: all(len(set(read_journal(j)) - before) >= 2 for j in journals.values()), 90,
             "every client to have deltas confirmed after the restart")
    assert [procs.terminate(c) for c in clients] == [0] * len(CLIENTS), procs.logs()
    confirmed = confirmed_ids(journals)
    after = confirmed - before
    wait_for(lambda: confirmed <= settled_ids(ckpt), 90, "the queue to drain")
    assert procs.terminate(coordinator) == 0, procs.logs()

    verdict = judge(confirmed, read_committed(ckpt))
    print(f"kill -9 of {broker.node} (pid {killed}) with {waiting} confirmed deltas waiting in the "
          f"queue; confirmed before={len(before)} after={len(after)}; restart took {restart_s:.1f}s; "
          + verdict.summary())
    assert verdict.ok, verdict.summary() + "\n" + procs.logs() + "\n" + broker.logs()
    final = status(run_name)
    assert final["coordinator"]["amqp_reconnects"] >= 1
    assert set(final["deltas"]["rejected_by_reason"]) <= {"already_sent"}
    assert verify_snapshot(run_name) == final["version"]
