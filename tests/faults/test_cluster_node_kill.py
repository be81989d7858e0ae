"""A node of a 3-node RabbitMQ cluster killed with kill -9 under load: the delta queue, a quorum
queue with a replica on each node, elects a new leader on the two nodes left, and every confirmed
delta is applied once, none twice.

The cluster is this test's own (tests/private_cluster.py: three nodes on spare loopback ports),
never the shared broker on 5672. The coordinator consumes from node 1; client theta publishes to
node 2, and client iota to node 3 first (its ``--amqp`` lists node 3's URL, then node 1's). The
delta queue is declared through node 3 before the coordinator starts, so its Raft leader lives
there (RabbitMQ places a quorum queue's leader on the declaring connection's node), and node 3 is
the node killed: the queue loses its leader and iota its broker, while the coordinator and theta
keep theirs. iota goes on through node 1, the next URL of its list: its deltas sent after the kill
are confirmed and applied.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from coordinator.consumer import QueueConfig, declare_queues, delta_queue_arguments
from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import Processes, wait_for
from shared.keys import RunKeys
from tests.faults.journals import confirmed_ids
from tests.private_broker import PrivateBroker
from tests.private_cluster import PrivateCluster, missing_tools, private_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# client id → indexes in cluster.nodes of the nodes its --amqp lists, in the order it tries them
CLIENT_NODES = {"theta": (1,), "iota": (2, 0)}
KILLED = 2  # node 3: the queue's leader and iota's first broker, neither the coordinator's nor theta's
CLIENT_SECONDS = 240  # a safety bound: the test stops the clients with SIGTERM well before


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """A 3-node RabbitMQ cluster of this module's own (booting one takes a minute; the test that
    kills a node comes last); stopped and its state removed whatever happens."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    with private_cluster(tmp_path_factory.mktemp("rabbitmq")) as started:
        yield started


def _declare_delta_queue_through(node: PrivateBroker, keys: RunKeys) -> None:
    """Declare the run's delta queue through ``node``, with the arguments the coordinator declares
    it with (its defaults), so the coordinator finds it as its own, with the leader on ``node``.

    Only that queue: the coordinator declares the dead-letter queue (a quorum queue too, with a
    replica on every node) through node 1, so its leader is not on the node killed.
    """
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        connection.channel().queue_declare(keys.delta_queue, durable=True,
                                           arguments=delta_queue_arguments(keys, QueueConfig()))
    finally:
        connection.close()


def _applied(checkpoint_dir: Path) -> set[str]:
    """Ids of the deltas that a landed commit recorded as applied."""
    return {e["id"] for e in read_committed(checkpoint_dir) if e["outcome"] == "applied"}


def _leader(cluster: PrivateCluster, queue: str) -> str | None:
    """The node that holds the Raft leader of ``queue``, as node 1 sees it (None while electing)."""
    return next((n for n, state in cluster.quorum_status(queue).items() if state == "leader"), None)


def test_several_delta_queues_put_their_leaders_on_different_nodes(
    cluster: PrivateCluster, run_name: str
) -> None:
    """--delta-queues 3 declared through one node: the first queue's leader is that node's (as
    always), the others are placed by the cluster (balanced), so publishes spread over the nodes."""
    keys = RunKeys(run_name)
    connection = pika.BlockingConnection(pika.URLParameters(cluster.nodes[0].url))
    try:
        declare_queues(connection.channel(), keys, QueueConfig(count=3))
    finally:
        connection.close()
    leaders = {name: wait_for(functools.partial(_leader, cluster, name), 60, f"a leader of {name}")
               for name in keys.delta_queues(3)}
    assert leaders[keys.delta_queue] == cluster.nodes[0].node
    assert len(set(leaders.values())) == 3, leaders  # one leader on each node


# cluster comes before procs, so its teardown runs after the processes are stopped
def test_killing_a_cluster_node_loses_and_doubles_nothing(
    cluster: PrivateCluster, procs: Processes, run_name: str, tmp_path: Path
) -> None:
    keys = RunKeys(run_name)
    home, killed_node = cluster.nodes[0], cluster.nodes[KILLED]
    _declare_delta_queue_through(killed_node, keys)
    members = cluster.quorum_status(keys.delta_queue)
    assert set(members) == {n.node for n in cluster.nodes}, members  # a replica on every node
    assert members[killed_node.node] == "leader", members

    ckpt, state = tmp_path / "ckpt", tmp_path / "state"
    # prefetch 2: once the coordinator holds two deliveries, further deltas wait in the queue itself
    coordinator = procs.start("coordinator", *coordinator_args(
        run_name, ckpt, "--amqp", home.url, "--prefetch", "2", "--commit-every", "1"))
    journals = {cid: tmp_path / f"{cid}.journal" for cid in CLIENT_NODES}
    _, key = run_key(tmp_path)  # the one coordinator_args signs with (beside ckpt)
    # --include-wait 0: clients go on training on the base they have while the coordinator is frozen,
    # so deltas pile up (the repeats on one base are refused already_sent once it thaws)
    urls = {cid: ",".join(cluster.nodes[i].url for i in nodes) for cid, nodes in CLIENT_NODES.items()}
    clients = {cid: procs.start(cid, *client_args(run_name, cid, state, journals[cid], CLIENT_SECONDS,
                                                  coordinator_key=key),
                                "--amqp", urls[cid], "--include-wait", "0")
               for cid in CLIENT_NODES}
    wait_for(lambda: all(len(read_journal(j)) >= 2 for j in journals.values()), 60, "deltas before")
    dead_letters = cluster.quorum_status(keys.dead_letter_queue)  # raises for a classic queue
    assert set(dead_letters) == {n.node for n in cluster.nodes}, dead_letters

    # Freeze the coordinator so that confirmed deltas wait in the queue (and two sit unacked with
    # it), then kill the node holding the leader: the followers on nodes 1 and 2 must have them.
    # The VM's pid is asked for first (a rabbitmqctl call of seconds), so that ``before`` is taken
    # right before the kill and not seconds of confirms earlier.
    vm = killed_node.vm_pid()
    os.kill(coordinator.pid, signal.SIGSTOP)
    try:
        waiting = wait_for(lambda: (n := home.ready_messages(keys.delta_queue)) >= 2 and n, 60,
                           "confirmed deltas to wait in the queue")
        before = confirmed_ids(journals)
        killed = killed_node.kill_vm(vm)
    finally:
        os.kill(coordinator.pid, signal.SIGCONT)
    leader = wait_for(lambda: _leader(cluster, keys.delta_queue), 30, "a new leader of the delta queue")
    assert leader in {n.node for n in cluster.nodes} - {killed_node.node}

    def sent_after(cid: str) -> set[str]:
        """Ids of the deltas of ``cid`` confirmed after ``before`` was taken."""
        return set(read_journal(journals[cid])) - before

    def two_sent_after(cid: str) -> bool:
        return len(sent_after(cid)) >= 2

    def applied_after(cid: str) -> set[str]:
        return _applied(ckpt) & sent_after(cid)

    # Both clients go on: theta through its broker, which lives, and iota through node 1, the next
    # URL of its list. Two deltas each confirmed after the kill (one may have been confirmed by the
    # old leader just before it) show the queue takes publishes under its new leader, from both.
    for cid in CLIENT_NODES:
        wait_for(functools.partial(two_sent_after, cid), 60, f"{cid} to have deltas confirmed after the kill")
    # iota lost node 3, then connected through node 1, and a delta sent through it is confirmed
    wait_for(lambda: "RabbitMQ is back" in procs.log("iota"), 60, "iota to reconnect through node 1")
    through_node_1 = set(read_journal(journals["iota"]))
    wait_for(lambda: set(read_journal(journals["iota"])) - through_node_1, 60,
             "a delta of iota confirmed through node 1")
    # ... and the coordinator still consumes: a delta of each sent after the kill gets applied (a
    # repeat on a base that already has the client's delta applied is refused already_sent meanwhile).
    applied = {cid: wait_for(functools.partial(applied_after, cid), 60,
                             f"a delta {cid} sent after the kill to be applied")
               for cid in CLIENT_NODES}
    for client in clients.values():
        assert procs.terminate(client) == 0, procs.logs()  # sends the round in hand, exits
    confirmed = confirmed_ids(journals)
    after = confirmed - before
    wait_for(lambda: confirmed <= settled_ids(ckpt), 60, "the queue to drain")
    assert procs.terminate(coordinator) == 0, procs.logs()

    verdict = judge(confirmed, read_committed(ckpt))
    final = status(run_name)
    print(f"kill -9 of {killed_node.node} (pid {killed}, the queue's leader) with {waiting} confirmed "
          f"deltas waiting in the queue; new leader {leader}; confirmed before={len(before)} "
          f"after={len(after)} (applied by then {sum(map(len, applied.values()))}); "
          f"coordinator reconnects={final['coordinator']['amqp_reconnects']}; " + verdict.summary())
    assert verdict.ok, verdict.summary() + "\n" + procs.logs() + "\n" + cluster.logs()
    assert set(final["deltas"]["rejected_by_reason"]) <= {"already_sent"}
    assert verify_snapshot(run_name) == final["version"]
    assert "exists with other arguments" not in procs.log("coordinator")  # the queue is as declared

