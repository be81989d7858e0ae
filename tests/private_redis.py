"""A private plain ``redis-server`` for tests of a Redis topology (a replica, a cluster node), never
the shared one on 6379.

Found on PATH (``deploy/services.sh`` installs it), on a free loopback port, with everything it
writes (log, a replica's received RDB, a cluster node's ``nodes.conf``) under one directory and
nothing persisted. :meth:`RedisProcess.stop` ends exactly the process it launched, by its pid
(:class:`tests.tls_servers.PrivateTlsRedis` is one too).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

from tests.private_broker import free_port

Started = TypeVar("Started", bound="StartedInBlock")


class StartedInBlock:
    """A context manager over ``start()`` and ``stop()``: started on entry (stopped again if the
    start fails), stopped on exit whatever happened."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: Started) -> Started:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RedisProcess:
    """One ``redis-server`` process of a test, under ``root``: its binary, port, log, and the stop
    that ends exactly the process :meth:`launch` started, by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, root: Path, scheme: str = "redis") -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise FileNotFoundError("redis-server is not installed (deploy/services.sh up installs it)")
        self.server = server
        self.root = root
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def launch(self, options: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``redis-server`` with ``options``, nothing persisted, its output in redis.log."""
        assert self.proc is None, "this server was started already"
        with open(self.root / "redis.log", "wb") as log:  # the process keeps its own descriptor
            self.proc = subprocess.Popen(
                [self.server, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.root), "--daemonize", "no", *options],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.proc

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server started here, SIGKILL it if it lingers. Idempotent."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)

    def logs(self, tail_chars: int = 4000) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace")[-tail_chars:] if path.exists() else ""


class PrivateRedis(RedisProcess, StartedInBlock):
    """``redis-server`` on 127.0.0.1:``port`` with ``options`` (e.g. ``--replicaof 127.0.0.1 P``).

    A context manager: started on entry, stopped on exit whatever happened.
    """

    def __init__(self, root: Path, *options: str) -> None:
        super().__init__(root)
        self.options: Sequence[str] = options

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it answers PING (MASTERDOWN counts as an answer)."""
        # repl-diskless-sync-delay 0: a primary sends its data to a new replica at once (default 5 s)
        proc = self.launch(["--port", str(self.port), "--repl-diskless-sync-delay", "0", *self.options])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{self.logs()}")
            try:
                with self.client() as probe:
                    probe.ping()
                return
            except redis.exceptions.MasterDownError:
                return  # up: a replica cut off from its primary, told not to serve stale data
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f}s:\n"
                           f"{self.logs()}")

    def client(self) -> redis.Redis:
        """A new plain client of this server (bytes replies); the caller closes it."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0)

    def replication(self) -> dict[str, Any]:
        """``INFO replication`` of this server."""
        with self.client() as admin:
            return dict(admin.info("replication"))



class PrivateRedisCluster(StartedInBlock):
    """A Redis Cluster of ``nodes`` private primaries on loopback ports (no replicas), the 16384
    slots split evenly between them: a context manager, every node stopped on exit by its pid.

    ``url`` is the cluster URL asyncloco takes (``redis+cluster://`` of the first node: the
    client discovers the others from it).
    """

    SLOTS = 16384

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.nodes = [PrivateRedis(root / f"node{i}", "--cluster-enabled", "yes",
                                   "--cluster-config-file", str(root / f"node{i}" / "nodes.conf"),
                                   # its own bus port: port + 10000 may be past 65535
                                   "--cluster-port", str(free_port()))
                      for i in range(nodes)]
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        share = -(-self.SLOTS // len(self.nodes))
        first = self.nodes[0]
        bus = int(first.options[first.options.index("--cluster-port") + 1])
        for index, node in enumerate(self.nodes):
            with node.client() as admin:
                low, high = index * share, min(self.SLOTS, (index + 1) * share) - 1
                admin.execute_command("CLUSTER", "ADDSLOTSRANGE", str(low), str(high))
                if index:
                    admin.execute_command("CLUSTER", "MEET", "127.0.0.1", str(first.port), str(bus))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ok(node) for node in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the private Redis cluster did not come up:\n"
                           + "\n".join(node.logs(1000) for node in self.nodes))

    @staticmethod
    def _ok(node: PrivateRedis) -> bool:
        with node.client() as admin:
            info = admin.cluster("info")
            return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) >= 2

    def node_of(self, key: str) -> int:
        """Which node (its index) holds ``key``'s slot."""
        with self.nodes[0].client() as admin:
            slot = int(admin.execute_command("CLUSTER", "KEYSLOT", key))
        return slot // -(-self.SLOTS // len(self.nodes))

    def keys(self, pattern: str) -> list[bytes]:
        """Every key matching ``pattern`` on every node."""
        found: list[bytes] = []
        for node in self.nodes:
            with node.client() as admin:
                found.extend(admin.scan_iter(match=pattern, count=1000))
        return found

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

