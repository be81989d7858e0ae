"""The volunteer's command line against the real servers: every mistake that restarting cannot cure
ends it in one line on stderr with its own exit code, no traceback; a server that goes away is
waited out and said so at the default log level.

The client is the real process (``python -m client.cli join``), as systemd would run it; nothing
stands in for Redis or RabbitMQ. Addresses that do not work are made of the real servers' ones:
a wrong password, a free port, a host name under ``.invalid``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import msgpack
import pytest
import redis

from coordinator.invites import invite, revoke
from coordinator.volunteers import VolunteerBook
from harness.processes import AMQP_URL, REDIS_URL, ROOT, Processes, wait_for
from shared import PROTOCOL_VERSION
from shared.errors import (
    AccessRefused,
    NoService,
    NoSuchRun,
    PermanentError,
    ProtocolMismatch,
    Revoked,
    UnknownHost,
)
from shared.keys import RunKeys
from tests.integration.test_invites import SERVERS
from tests.private_broker import free_port
from tests.relay import OutageProxy

pytestmark = pytest.mark.integration

KEY = "ab" * 32  # the coordinator key the client pins (no snapshot is ever read here)
NO_SUCH_HOST = "nosuchhost.invalid"  # .invalid never resolves (RFC 2606)


def _url(url: str, *, netloc: str) -> str:
    return urlparse(url)._replace(netloc=netloc).geturl()


def _port(url: str) -> int:
    return urlparse(url).port or (6379 if url.startswith("redis") else 5672)


def _dns_says_no() -> bool:
    """True if this machine's resolver answers "no such name" (not "try again": no DNS at all)."""
    try:
        socket.getaddrinfo(NO_SUCH_HOST, 80)
    except socket.gaierror as exc:
        return exc.errno in {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    return False


def join(tmp_path: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``asyncloco-client join`` to its end; the servers are the real ones unless ``args`` say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCLOCO_")}
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "join", "--client-id", "exit-test", "--threads", "1",
         "--device", "cpu", "--state-dir", str(tmp_path / "state"), "--coordinator-key", KEY,
         "--redis", REDIS_URL, "--amqp", AMQP_URL, *args],
        cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=timeout_s)


def error_line(output: str) -> str:
    """The one ``error:`` line, which must also be the last line; no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], output
    assert "Traceback" not in output, output
    return errors[0]


PORT_REDIS, PORT_AMQP = _port(REDIS_URL), _port(AMQP_URL)
FIRST_CONTACT = [
    pytest.param(("--redis", _url(REDIS_URL, netloc=f"nobody:wrong@127.0.0.1:{PORT_REDIS}")), AccessRefused,
                 f"Redis at 127.0.0.1:{PORT_REDIS} refused user 'nobody' (", id="redis-wrong-password"),
    pytest.param(("--amqp", _url(AMQP_URL, netloc=f"guest:wrong@127.0.0.1:{PORT_AMQP}")), AccessRefused,
                 f"RabbitMQ at 127.0.0.1:{PORT_AMQP} refused user 'guest' (", id="amqp-wrong-password"),
    pytest.param(("--redis", _url(REDIS_URL, netloc=f"{NO_SUCH_HOST}:{PORT_REDIS}")), UnknownHost,
                 f"unknown host '{NO_SUCH_HOST}' for Redis", id="redis-unknown-host"),
    pytest.param(("--amqp", _url(AMQP_URL, netloc=f"guest:guest@{NO_SUCH_HOST}:{PORT_AMQP}")), UnknownHost,
                 f"unknown host '{NO_SUCH_HOST}' for RabbitMQ", id="amqp-unknown-host"),
    pytest.param(("--redis", "redis://127.0.0.1:{free}/0"), NoService,
                 "nothing listens at 127.0.0.1:{free} for Redis (connection refused)", id="redis-wrong-port"),
    pytest.param(("--amqp", "amqp://guest:guest@127.0.0.1:{free}/%2F"), NoService,
                 "nothing listens at 127.0.0.1:{free} for RabbitMQ (connection refused)",
                 id="amqp-wrong-port"),
    pytest.param(("--redis", _url(REDIS_URL, netloc=f"127.0.0.1:{PORT_AMQP}")), NoService,
                 f"127.0.0.1:{PORT_AMQP} answers, but not as Redis", id="redis-url-to-the-broker"),
]


@pytest.mark.parametrize(("args", "error", "fragment"), FIRST_CONTACT)
def test_a_mistake_at_first_contact_ends_the_client_at_once_in_one_line(
    tmp_path: Path, args: tuple[str, str], error: type[PermanentError], fragment: str
) -> None:
    if NO_SUCH_HOST in args[1] and not _dns_says_no():
        pytest.skip("this machine's resolver does not answer (no DNS): an unknown host cannot be told")
    free = str(free_port())
    started = time.monotonic()
    done = join(tmp_path, args[0], args[1].replace("{free}", free), "--run", "exits", "--run-wait", "0")
    assert done.returncode == error.exit_code, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [error_line(done.stderr)], done.stderr  # that line alone
    assert error_line(done.stderr).startswith("error: " + fragment.replace("{free}", free)), done.stderr
    assert "wrong" not in done.stderr  # the password is never shown
    assert "round " not in done.stdout  # nothing was trained
    assert time.monotonic() - started < 30  # refused, not retried


@pytest.fixture
def redis_with_a_password(tmp_path: Path) -> Iterator[int]:
    """A private redis-server that requires a password (the shared one has none); its port."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=port, password="s3cret", socket_connect_timeout=1)
        wait_for(lambda: _pings(probe), 10, "the private redis-server")
        probe.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def test_no_password_for_a_redis_that_wants_one_is_refused_in_one_line(
    tmp_path: Path, redis_with_a_password: int
) -> None:
    done = join(tmp_path, "--redis", f"redis://127.0.0.1:{redis_with_a_password}/0", "--run", "exits")
    assert done.returncode == AccessRefused.exit_code, done.stderr
    assert error_line(done.stderr) == (
        f"error: Redis at 127.0.0.1:{redis_with_a_password} refused this client (no user in the URL) "
        "(Authentication required.): check the user and password in the join token or --redis")


def test_a_run_that_never_shows_up_ends_the_client_after_the_run_wait(tmp_path: Path, run_name: str) -> None:
    started = time.monotonic()
    done = join(tmp_path, "--run", run_name, "--run-wait", "1")
    assert done.returncode == NoSuchRun.exit_code, done.stderr
    assert done.stderr.strip().splitlines() == [error_line(done.stderr)]
    assert error_line(done.stderr).startswith(
        f"error: no run '{run_name}' in Redis at 127.0.0.1:{PORT_REDIS}: nothing of it was published in "
        "1 s; check the run name")
    assert "waiting for the coordinator to publish the first snapshot" in done.stdout  # said meanwhile
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("theirs", "advice"), [
    (PROTOCOL_VERSION + 1, "upgrade asyncloco on this machine"),
    (PROTOCOL_VERSION - 1, "the coordinator is older: ask the run's operator to upgrade it"),
])
def test_a_coordinator_of_another_protocol_ends_the_client_saying_what_to_upgrade(
    tmp_path: Path, run_name: str, redis_client: redis.Redis, theirs: int, advice: str
) -> None:
    keys = RunKeys(run_name)
    # What a coordinator of that protocol publishes: an envelope this client cannot read.
    envelope = {"protocol": theirs, "type": "signed", "body": b"manifest", "signature": b"s" * 64}
    redis_client.set(keys.manifest(0), msgpack.packb(envelope, use_bin_type=True))
    redis_client.set(keys.current, b"0")
    done = join(tmp_path, "--run", run_name, "--run-wait", "1")
    assert done.returncode == ProtocolMismatch.exit_code, done.stderr
    assert error_line(done.stderr).startswith(
        f"error: run '{run_name}': the coordinator speaks protocol {theirs}, this client protocol "
        f"{PROTOCOL_VERSION}: {advice}"), done.stderr
    assert f"is in protocol {theirs}" in done.stderr  # the wait before was said once


def test_a_revoked_volunteer_is_ended_in_one_line_and_not_retried(
    tmp_path: Path, run_name: str, redis_client: redis.Redis, procs: Processes
) -> None:
    book = VolunteerBook.open(tmp_path / "ckpt")
    token = invite(run=run_name, name="mallory", servers=SERVERS, redis_client=redis_client, book=book,
                   coordinator_key=KEY)
    token_file = tmp_path / "mallory.token"
    token_file.write_text(token.encode())
    token_file.chmod(0o600)
    try:
        client = procs.start("mallory", "-m", "client.cli", "join", "--token-file", str(token_file),
                             "--threads", "1", "--device", "cpu", "--state-dir", str(tmp_path / "state"),
                             "--run-wait", "0")
        # Both servers let it in: it waits for the run's first snapshot.
        wait_for(lambda: "waiting for the coordinator" in procs.log("mallory"), 60, "its first contact")
        revoked_at = time.monotonic()
        revoke(run=run_name, name="mallory", servers=SERVERS, redis_client=redis_client, book=book)
        assert client.wait(timeout=30) == Revoked.exit_code, procs.log("mallory")
    finally:
        if "mallory" in book.volunteers and book.volunteers["mallory"].revoked_at is None:
            revoke(run=run_name, name="mallory", servers=SERVERS, redis_client=redis_client, book=book)
    line = error_line(procs.log("mallory"))
    assert " no longer lets user " in line and "invitation was revoked" in line, line
    assert time.monotonic() - revoked_at < 30


def test_a_redis_that_goes_away_is_waited_out_and_said_so_at_the_default_log_level(
    tmp_path: Path, run_name: str, procs: Processes
) -> None:
    proxy = OutageProxy(PORT_REDIS)
    proxy.up()
    try:
        client = procs.start("patient", "-m", "client.cli", "join", "--run", run_name,
                             "--client-id", "patient", "--threads", "1", "--device", "cpu",
                             "--state-dir", str(tmp_path / "state"),
                             "--coordinator-key", KEY, "--run-wait", "0",
                             "--redis", _url(REDIS_URL, netloc=f"127.0.0.1:{proxy.port}"))
        wait_for(lambda: "waiting for the coordinator" in procs.log("patient"), 60, "its first contact")
        proxy.down_for(3.0)  # refused, as at a wrong port; but it answered before: an outage

        def said(text: str) -> bool:
            return f"WARNING client.fetcher: {text}" in procs.log("patient")

        wait_for(lambda: said("Redis unavailable"), 20, "the outage said")
        wait_for(lambda: said("Redis is back after"), 30, "its end said")
        assert client.poll() is None, procs.log("patient")
        assert procs.terminate(client) == 0
    finally:
        proxy.down()
    log = procs.log("patient")
    assert "error:" not in log and "Traceback" not in log, log
    assert log.count("Redis unavailable") == 1, log  # once, not once per retry
