"""Real processes on the real servers, for tests and benchmarks.

:class:`Processes` starts Python processes (a coordinator, clients) with their output in one log
file each and stops exactly those, by their own handles, whatever happens. The servers are the
real Redis and RabbitMQ on 127.0.0.1 (``ASYNCLOCO_TEST_REDIS`` / ``ASYNCLOCO_TEST_AMQP`` name
others); :func:`ensure_services` runs ``deploy/services.sh up`` once if either is not reachable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# The repository: this package lives in it (an editable install, as `make venv` does), so the
# folder above it holds deploy/services.sh and is the working directory of the processes.
ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("ASYNCLOCO_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("ASYNCLOCO_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port`` within a second."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ensure_services() -> None:
    """Start (or install) Redis and RabbitMQ with ``deploy/services.sh up`` unless both are up."""
    if reachable(6379) and reachable(5672):
        return
    script = ROOT / "deploy" / "services.sh"
    if not script.exists():
        raise RuntimeError(f"Redis/RabbitMQ are not running and {script} is missing: the harness "
                           "starts them only from a checkout of the repository")
    result = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"could not start Redis/RabbitMQ: {result.stdout}{result.stderr}")


def new_run_name(prefix: str = "test") -> str:
    """A run name nobody else uses: ``prefix`` and 8 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(predicate: Callable[[], T], timeout_s: float = 20.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class Processes:
    """Start processes and end exactly those (by their own handles), whatever happens in a test."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        # on battery too: a test run on an unplugged laptop must not sit paused (client/politeness.py)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", ASYNCLOCO_REDIS=REDIS_URL, ASYNCLOCO_AMQP=AMQP_URL,
                        ASYNCLOCO_RUN_ON_BATTERY="1")

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Run ``python ARGS`` in the repository with its output appended to ``logdir/NAME.log``."""
        log = open(self.logdir / f"{name}.log", "a")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        """Every log, each under its name: the message of a failed assertion."""
        paths = sorted(self.logdir.glob("*.log"))
        return "\n".join(f"----- {p.name}\n{p.read_text()[-4000:]}" for p in paths)

    def terminate(self, proc: subprocess.Popen, timeout_s: float = 30) -> int:
        """SIGTERM ``proc`` (a clean stop: the coordinator commits) and return its exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"process {proc.pid} ignored SIGTERM for {timeout_s:.0f}s") from None

    def stop_all(self) -> None:
        """SIGTERM every process started here that still runs, wait, SIGKILL those that linger."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
