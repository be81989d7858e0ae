"""``serve``'s exit codes without servers: each mistake that no restart can cure ends the coordinator
in one line with a code of its own (README's operator table), which its systemd unit does not
restart on; a broker that let it in once and then goes away stays an outage to wait out.

The coordinator is the real one up to its first contact with a server; where a server must answer,
a socket on 127.0.0.1 that speaks just enough of the protocol to refuse does.
"""

from __future__ import annotations

import queue
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

import coordinator.cli as cli
from coordinator.consumer import DeltaConsumer, QueueConfig
from shared.errors import (
    SERVE_PERMANENT_ERRORS,
    AccessRefused,
    NoService,
    UnknownHost,
)
from shared.keys import RunKeys
from shared.settings import ConnectionSettings, RetryPolicy
from tests.unit.test_coordinator_cli import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[2]
NO_SUCH_HOST = "nosuchhost.invalid"


@pytest.fixture
def no_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real coordinator, but pytest's own signal handlers kept."""
    monkeypatch.setattr(cli, "_install_signals", lambda stop: None)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def no_such_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS says NO_SUCH_HOST does not exist, whatever this machine's resolver would say."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == NO_SUCH_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def refusing_redis() -> Iterator[int]:
    """A socket that answers every Redis command as a Redis refusing the password does; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    while conn.recv(4096):
                        conn.sendall(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


def _serve(tmp_path: Path, redis_url: str) -> Result:
    return invoke(["serve", "--run", "exits", "--auth", "open", "--checkpoint-dir", str(tmp_path / "ckpt"),
                   "--redis", redis_url, "--max-seconds", "1"])


# --- Redis at first contact ----------------------------------------------------------------------


def test_nothing_listening_at_the_redis_port_ends_serve_with_its_code(
    tmp_path: Path, closed_port: int, no_signals: None
) -> None:
    result = _serve(tmp_path, f"redis://127.0.0.1:{closed_port}/0")
    assert_one_line_error(result, NoService.exit_code,
                          f"nothing listens at 127.0.0.1:{closed_port} for Redis (connection refused): "
                          "check the port in --redis, and that the server is running")
    assert "join token" not in result.stderr  # the operator's own URL, not a volunteer's token


def test_an_unknown_redis_host_ends_serve_with_its_code(
    tmp_path: Path, no_such_host: None, no_signals: None
) -> None:
    result = _serve(tmp_path, f"redis://{NO_SUCH_HOST}:6379/0")
    assert_one_line_error(result, UnknownHost.exit_code, f"unknown host '{NO_SUCH_HOST}' for Redis")


def test_a_wrong_redis_password_ends_serve_with_its_code_and_never_shows_it(
    tmp_path: Path, refusing_redis: int, no_signals: None
) -> None:
    result = _serve(tmp_path, f"redis://coord:hunter2@127.0.0.1:{refusing_redis}/0")
    assert_one_line_error(result, AccessRefused.exit_code,
                          f"Redis at 127.0.0.1:{refusing_redis} refused user 'coord' (")
    assert "check the user and password in --redis" in result.stderr
    assert "hunter2" not in result.output


# --- RabbitMQ: the consumer's first contact ------------------------------------------------------


def _consumer(amqp_url: str) -> DeltaConsumer:
    return DeltaConsumer(connection=ConnectionSettings(amqp_url=amqp_url), keys=RunKeys("exits"),
                         config=QueueConfig(), retry=RetryPolicy(initial_delay_s=0.05, max_delay_s=0.05),
                         inbox=queue.Queue())


def test_the_consumer_gives_up_at_once_when_nothing_listens_at_first_contact(closed_port: int) -> None:
    consumer = _consumer(f"amqp://coord:s3cret@127.0.0.1:{closed_port}/run")
    consumer.run()  # on this thread: it must return by itself
    assert isinstance(consumer.fatal, NoService)
    assert str(consumer.fatal).startswith(f"nothing listens at 127.0.0.1:{closed_port} for RabbitMQ")
    assert "check the port in --amqp," in str(consumer.fatal)
    assert consumer.reconnects == 0


def test_the_consumer_gives_up_at_once_on_an_unknown_host(no_such_host: None) -> None:
    consumer = _consumer(f"amqp://coord:s3cret@{NO_SUCH_HOST}:5672/run")
    consumer.run()
    assert isinstance(consumer.fatal, UnknownHost)
    assert f"unknown host '{NO_SUCH_HOST}' for RabbitMQ" in str(consumer.fatal)


def test_a_broker_that_let_the_consumer_in_once_is_an_outage_when_it_goes(closed_port: int) -> None:
    consumer = _consumer(f"amqp://coord:s3cret@127.0.0.1:{closed_port}/run")
    consumer.contact.answered()  # as after a first good connection
    consumer.start()
    try:
        deadline = threading.Event()
        while consumer.reconnects < 3 and not deadline.wait(0.05):
            pass
        assert consumer.fatal is None and consumer.is_alive()  # it keeps retrying
    finally:
        consumer.stop()
        consumer.join(timeout=5)
    assert not consumer.is_alive()


# --- where the codes are written down ------------------------------------------------------------


def test_the_systemd_unit_does_not_restart_serve_on_a_permanent_mistake() -> None:
    unit = (ROOT / "deploy/systemd/asyncloco-coordinator.service").read_text()
    (line,) = re.findall(r"^RestartPreventExitStatus=(.*)$", unit, flags=re.MULTILINE)
    prevented = {int(code) for code in line.split()}
    assert prevented == {2} | {error.exit_code for error in SERVE_PERMANENT_ERRORS}
    assert re.search(r"^Restart=on-failure$", unit, flags=re.MULTILINE)  # the rest is restarted


def test_the_readme_lists_every_exit_code_of_serve() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("exit codes of `serve`"):]
    section = section[: section.index("\n\n", section.index("| exit |"))]
    codes = {int(m) for m in re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)}
    assert codes == {0} | {error.exit_code for error in SERVE_PERMANENT_ERRORS}
    assert "| 1 / 2 |" in section
