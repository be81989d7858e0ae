"""A private plain ``redis-server`` for tests of a Redis topology (a replica, a cluster node), never
the shared one on 6379.

Found on PATH as :class:`tests.tls_servers.PrivateTlsRedis` finds it (``deploy/services.sh`` installs
it), on a free loopback port, with everything it writes (log, a replica's received RDB, a cluster
node's ``nodes.conf``) under one directory and nothing persisted. :meth:`PrivateRedis.stop` ends
exactly the process :meth:`PrivateRedis.start` launched, by its pid.
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
from typing import Any

import redis

from tests.private_broker import free_port


class PrivateRedis:
    """``redis-server`` on 127.0.0.1:``port`` with ``options`` (e.g. ``--replicaof 127.0.0.1 P``).

    A context manager: started on entry, stopped on exit whatever happened.
    """

    def __init__(self, root: Path, *options: str) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise FileNotFoundError("redis-server is not installed (deploy/services.sh up installs it)")
        self.server = server
        self.root = root
        self.options: Sequence[str] = options
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it answers PING (MASTERDOWN counts as an answer)."""
        assert self.proc is None, "this server was started already"
        log = open(self.root / "redis.log", "wb")  # noqa: SIM115 - the process owns it
        # repl-diskless-sync-delay 0: a primary sends its data to a new replica at once (default 5 s)
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), "--daemonize", "no",
             "--repl-diskless-sync-delay", "0", *self.options],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.logs()}")
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

    def __enter__(self) -> PrivateRedis:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
