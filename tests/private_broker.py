"""A private RabbitMQ node for tests that kill or restart a broker (never the shared one on 5672).

The node is named ``asyncloco-PORT@localhost`` (as ``deploy/services.sh`` names its extra nodes)
and keeps everything it owns under one directory: config, Erlang cookie (its own ``HOME``),
Mnesia and quorum-queue data, logs. So a test can kill -9 exactly this node's Erlang VM, found by
its OS pid, start it again on the same data, and remove every trace afterwards.

It runs as the current user: on Debian the real start script under ``/usr/lib/rabbitmq/bin`` is
called directly, not the ``/usr/sbin`` wrapper that switches to the ``rabbitmq`` user (who could
not write a test's temporary directory).

With ``tls=`` (files from :class:`tests.tls_servers.ThrowawayCA`) the node has one listener, on
``port``, and it speaks TLS only: no plain AMQP port at all, and ``url`` is ``amqps://``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pika
import pika.exceptions

from shared.processes import pid_alive
from shared.settings import ConnectionSettings, amqp_parameters

if TYPE_CHECKING:  # tests.tls_servers imports this module (free_port)
    from tests.tls_servers import TlsFiles

# How often a node that found one of its ports taken is started again on a fresh one.
PORT_RETRIES = 3

# Debian's real scripts; the ones in /usr/sbin are wrappers that su to the rabbitmq user.
DEBIAN_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_tool(name: str) -> str | None:
    """Path of ``rabbitmq-server`` / ``rabbitmqctl`` to run as this user, or None if not installed."""
    direct = DEBIAN_BIN / name
    if direct.is_file() and os.access(direct, os.X_OK):
        return str(direct)
    for folder in ("/usr/local/sbin", "/usr/sbin", "/opt/homebrew/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_epmd(port: int) -> None:
    """Ask exactly the epmd on ``port`` to exit (a no-op if none runs there; epmd refuses while a
    node is still registered with it)."""
    epmd = shutil.which("epmd")
    if epmd is not None:
        subprocess.run([epmd, "-port", str(port), "-kill"], env=dict(os.environ, ERL_EPMD_PORT=str(port)),
                       capture_output=True, timeout=30, check=False)


def _tls_listener_conf(port: int, tls: TlsFiles) -> str:
    """rabbitmq.conf of a node whose one listener, 127.0.0.1:``port``, speaks TLS with ``tls``.

    Clients are not asked for certificates (they log in with a user and password inside TLS).
    """
    return (
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {tls.ca_cert}\n"
        f"ssl_options.certfile = {tls.cert}\n"
        f"ssl_options.keyfile = {tls.key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )


class PrivateBroker:
    """One RabbitMQ node on 127.0.0.1:``port`` with all its state under ``root``.

    :meth:`start` launches the node in the foreground (a ``sh`` proxy with the Erlang VM as its
    child) and waits until it accepts AMQP connections; :meth:`vm_pid` is the Erlang VM's OS pid;
    :meth:`stop` shuts the node down cleanly, killing the VM if it does not go.
    """

    def __init__(self, root: Path, tls: TlsFiles | None = None, *, epmd_port: int | None = None,
                 cookie: str | None = None) -> None:
        server, ctl = rabbitmq_tool("rabbitmq-server"), rabbitmq_tool("rabbitmqctl")
        if server is None or ctl is None:
            raise FileNotFoundError("rabbitmq-server / rabbitmqctl are not installed")
        self.server, self.ctl_path = server, ctl
        self.root = root
        self.tls = tls
        self.tls_ca_file: str | None = None  # what a client passes as --tls-ca (TLS mode)
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._came_up = False  # has the node accepted logins once (its name is settled then)?
        # A port mapper daemon (epmd) of its own, so that the node neither needs nor leaves
        # behind a shared one; :meth:`stop` ends it. Nodes of one cluster share theirs
        # (``epmd_port``): a node finds another's distribution port through the epmd it knows.
        self.epmd_port = free_port() if epmd_port is None else epmd_port
        self.owns_epmd = epmd_port is None  # else whoever handed the port in ends that epmd
        for sub in ("home", "mnesia", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if cookie is not None:  # nodes of one cluster (and their rabbitmqctl) share one cookie
            cookie_file = root / "home" / ".erlang.cookie"
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)  # Erlang refuses a cookie file that others can read
        (root / "enabled_plugins").write_text("[].\n")  # no management plugin: no port clash
        (root / "rabbitmq-env.conf").write_text("")
        self._configure(free_port(), free_port())

    def _configure(self, port: int, dist_port: int) -> None:
        """Name the node after ``port`` and write its config and environment for these ports.

        ``dist_port`` is Erlang distribution's (rabbitmqctl talks to the node on it).
        """
        root, tls = self.root, self.tls
        self.port, self.dist_port = port, dist_port
        self.node = f"asyncloco-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        # The system rabbitmq.conf may pin a listener to 5672, and rabbitmq-env.conf may name
        # the node: this node reads neither.
        conf = f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
        if tls is not None:
            # TLS only: self.port speaks TLS (no plain listener at all) and self.url is amqps://.
            conf = _tls_listener_conf(self.port, tls)
            self.url = f"amqps://guest:guest@127.0.0.1:{self.port}/%2F"
            self.tls_ca_file = str(tls.ca_cert)
        (root / "rabbitmq.conf").write_text(conf)
        self.env = dict(
            os.environ,
            HOME=str(root / "home"),  # the Erlang cookie lives here: server and rabbitmqctl share it
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONFIG_FILE=str(root / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(root / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(root / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(root / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(root / "mnesia"),
            RABBITMQ_LOG_BASE=str(root / "log"),
            RABBITMQ_PID_FILE=str(root / "rabbitmq.pid"),
        )
        if tls is not None:  # these two would add a plain listener on self.port
            del self.env["RABBITMQ_NODE_IP_ADDRESS"], self.env["RABBITMQ_NODE_PORT"]

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the node (on the data it has, if any) and wait until it accepts AMQP logins."""
        self.launch()
        self.wait_until_up(timeout_s)

    def launch(self) -> None:
        """Start the node's process and return at once (:meth:`wait_until_up` waits for it)."""
        assert self.proc is None or self.proc.poll() is not None, "the node is already running"
        self._starts += 1
        log = open(self.root / f"server-{self._starts}.out", "wb")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([self.server], cwd=self.root, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def wait_until_up(self, timeout_s: float = 120.0) -> None:
        """Wait until the launched node accepts AMQP logins; raise if it exits or takes too long."""
        assert self.proc is not None, "launch() the node first"
        deadline = time.monotonic() + timeout_s
        port_retries = PORT_RETRIES
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if port_retries > 0 and self._repick_taken_port():
                    port_retries -= 1
                    self.launch()
                    continue
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}:\n{self.logs()}")
            if self.accepts_logins():
                self._came_up = True
                return
            time.sleep(0.25)
        raise RuntimeError(f"RabbitMQ node {self.node} did not come up within {timeout_s:.0f}s:\n"
                           f"{self.logs()}")

    def _repick_taken_port(self) -> bool:
        """After the node exited: if a port it was given was taken meanwhile (:func:`free_port`
        only saw it free a moment earlier; an outgoing connection may have been handed it since),
        give it a fresh one and say True. The AMQP port names the node and its data, so it is
        changed only before the node's first start succeeded."""
        output = (self.root / f"server-{self._starts}.out").read_text(errors="replace")
        if "dist_port_already_used" in output:
            self._configure(self.port, free_port())
            return True
        if "eaddrinuse" in output and not self._came_up:
            self._configure(free_port(), free_port())
            return True
        return False

    def accepts_logins(self) -> bool:
        params = amqp_parameters(ConnectionSettings(amqp_url=self.url, tls_ca_file=self.tls_ca_file))
        params.connection_attempts = 1
        try:
            connection = pika.BlockingConnection(params)
        except (pika.exceptions.AMQPError, OSError):
            return False
        connection.close()
        return True

    def ready_messages(self, queue: str) -> int:
        """Messages ready in ``queue`` (not delivered to any consumer), as this node sees them."""
        connection = pika.BlockingConnection(
            amqp_parameters(ConnectionSettings(amqp_url=self.url, tls_ca_file=self.tls_ca_file)))
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
        finally:
            connection.close()

    def ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node and return its output."""
        result = subprocess.run([self.ctl_path, "-q", "-n", self.node, *args], env=self.env,
                                capture_output=True, text=True, timeout=timeout_s, check=True)
        return result.stdout

    def vm_pid(self) -> int:
        """The OS pid of this node's Erlang VM (beam.smp), as the VM itself reports it."""
        pid = int(self.ctl("eval", "os:getpid().").strip().strip('"'))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
        assert not cmdline or b"beam" in cmdline, f"pid {pid} is not an Erlang VM: {cmdline[:200]!r}"
        return pid

    def kill_vm(self, pid: int | None = None) -> int:
        """kill -9 this node's Erlang VM (and no other process); return the pid killed.

        ``pid`` is the VM's, from :meth:`vm_pid` earlier: asking the VM takes seconds (a
        rabbitmqctl call), so a test that must kill at a known moment asks beforehand.
        """
        pid = self.vm_pid() if pid is None else pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), f"the Erlang VM {pid} survived SIGKILL"
        if self.proc is not None:
            self.proc.wait(timeout=30)  # the sh proxy exits with its child
        return pid

    def stop(self) -> None:
        """Stop the node cleanly (kill its VM if it does not stop), then its own epmd. Idempotent."""
        try:
            self._stop_node()
        finally:
            if self.owns_epmd:
                stop_epmd(self.epmd_port)

    def _stop_node(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pid: int | None = None
        try:
            pid = self.vm_pid()
            self.ctl("stop", timeout_s=90)
        except (subprocess.SubprocessError, ValueError, AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # the proxy turns it into a clean stop
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if pid is not None and pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def logs(self, tail_chars: int = 4000) -> str:
        paths = sorted(self.root.glob("server-*.out")) + sorted((self.root / "log").glob("*.log"))
        return "\n".join(f"----- {p.name}\n{p.read_text(errors='replace')[-tail_chars:]}" for p in paths)
