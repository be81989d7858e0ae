"""A private 3-node RabbitMQ cluster on loopback ports, for tests that kill one node of it.

Three :class:`~tests.private_broker.PrivateBroker` nodes, each with its own AMQP port, data and
logs under one directory, share one Erlang cookie and one port mapper daemon (epmd, on a spare
port: a node finds another's distribution port through it). Nodes 2 and 3 join node 1
(``stop_app``, ``join_cluster``, ``start_app``), and :meth:`PrivateCluster.start` returns once
node 1's ``cluster_status`` lists every node as running. :meth:`PrivateCluster.stop` stops exactly
the nodes it started (each by its own name and pid), then that epmd.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.private_broker import PrivateBroker, free_port, rabbitmq_tool, stop_epmd


def missing_tools() -> str | None:
    """Why a private cluster cannot run here (a skip reason), or None if it can."""
    missing = [t for t in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-queues") if rabbitmq_tool(t) is None]
    if missing:
        return f"needs {', '.join(missing)} installed to run a private RabbitMQ cluster"
    if shutil.which("epmd") is None:
        return "needs epmd (Erlang) on PATH to run a private RabbitMQ cluster"
    return None


class PrivateCluster:
    """``size`` RabbitMQ nodes on 127.0.0.1, clustered, with all their state under ``root``.

    ``nodes[0]`` is the node the others joined; any node serves AMQP on its own ``url``.
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.epmd_port = free_port()
        cookie = secrets.token_hex(16).upper()
        self.nodes = [PrivateBroker(root / f"node{i + 1}", epmd_port=self.epmd_port, cookie=cookie)
                      for i in range(size)]
        queues = rabbitmq_tool("rabbitmq-queues")
        assert queues is not None, missing_tools()
        self.queues_path = queues

    def start(self, timeout_s: float = 120.0) -> None:
        """Boot every node (at once: each spends most of its boot waiting on itself), join nodes
        2.. to node 1, and wait until node 1 counts them all as running."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_until_up(max(1.0, deadline - time.monotonic()))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            left_s = max(1.0, deadline - time.monotonic())
            node.ctl("stop_app", timeout_s=left_s)
            node.ctl("join_cluster", first.node, timeout_s=left_s)
            node.ctl("start_app", timeout_s=left_s)
        wanted = {n.node for n in self.nodes}
        while self.running_nodes() != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not form within {timeout_s:.0f}s: running "
                                   f"{sorted(self.running_nodes())}, wanted {sorted(wanted)}\n{self.logs()}")
            time.sleep(0.5)

    def running_nodes(self, via: PrivateBroker | None = None) -> set[str]:
        """The nodes that ``via`` (node 1 by default) sees running in its cluster."""
        out = (via or self.nodes[0]).ctl("cluster_status", "--formatter", "json")
        return set(json.loads(out)["running_nodes"])

    def quorum_status(self, queue: str, via: PrivateBroker | None = None) -> dict[str, str]:
        """Each member of quorum queue ``queue`` (a node name) and its Raft state (``leader``,
        ``follower``, ...; ``unreachable`` for a member that is down), as
        ``rabbitmq-queues quorum_status`` on ``via`` (node 1) reports them."""
        node = via or self.nodes[0]
        out = subprocess.run([self.queues_path, "-q", "-n", node.node, "quorum_status", queue,
                              "--formatter", "json"], env=node.env, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        # a member that is down has an error term, e.g. ["nodedown", NODE], instead of a state
        return {row["Node Name"]: row["Raft State"] if isinstance(row["Raft State"], str) else "unreachable"
                for row in json.loads(out)}

    def stop(self) -> None:
        """Stop every node this cluster started (each by its own name, its VM killed if it does
        not stop), then the epmd they shared. Idempotent."""
        try:
            for node in reversed(self.nodes):
                node.stop()
        finally:
            stop_epmd(self.epmd_port)

    def logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(f"===== {n.node}\n{n.logs(tail_chars)}" for n in self.nodes)


@contextmanager
def private_cluster(root: Path, size: int = 3) -> Iterator[PrivateCluster]:
    """A started :class:`PrivateCluster` under ``root``; stopped and ``root`` removed afterwards,
    whatever happens (a failed start included)."""
    cluster = PrivateCluster(root, size)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
