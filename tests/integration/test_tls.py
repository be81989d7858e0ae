"""TLS end to end: a throwaway CA, a Redis and a RabbitMQ node that speak TLS only on 127.0.0.1.

A coordinator and a real client process train over ``rediss://`` and ``amqps://`` with ``--tls-ca``.
Everything that would be wrong is refused in one line instead of being retried for ever: a client
that trusts only the system's CAs, a server certificate for another host name, a plain URL to a
TLS port. The servers are this module's own (never the shared ones on 6379/5672) and are ended by
pid when it finishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.config import CommitConfig, CoordinatorConfig
from coordinator.identity import AuthMode
from coordinator.service import Coordinator
from coordinator.status import read_status
from harness.processes import AMQP_URL, ROOT, Processes, new_run_name, wait_for
from shared.errors import ConfigError
from shared.settings import ConnectionSettings, amqp_parameters, connect_redis, open_amqp
from shared.tls import server_address
from tests.private_broker import PrivateBroker, rabbitmq_tool
from tests.services import SMALL_TASK, serving
from tests.tls_servers import PrivateTlsRedis, ThrowawayCA

pytestmark = pytest.mark.integration

CLIENT_ARGS = ["--threads", "1", "--device", "cpu", "--log-level", "warning"]


@dataclass(frozen=True)
class TlsServers:
    ca_file: str  # what --tls-ca is given
    redis: PrivateTlsRedis  # certificate for 127.0.0.1 and localhost
    broker: PrivateBroker  # the same certificate; no plain listener
    wrong_host: PrivateTlsRedis  # a certificate from the same CA for wrong.example only

    def settings(self, *, redis_url: str | None = None, amqp_url: str | None = None) -> ConnectionSettings:
        """These servers (or the URLs given), with the CA trusted."""
        return ConnectionSettings(redis_url=redis_url or self.redis.url, amqp_url=amqp_url or self.broker.url,
                                  tls_ca_file=self.ca_file, socket_timeout_s=5.0)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    if rabbitmq_tool("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    root = tmp_path_factory.mktemp("tls")
    ca = ThrowawayCA(root / "ca")
    good = ca.issue("server", ["127.0.0.1", "localhost"])
    started: list[PrivateTlsRedis | PrivateBroker] = []
    try:
        redis_server = PrivateTlsRedis(root / "redis", good)
        started.append(redis_server)
        redis_server.start()
        wrong = PrivateTlsRedis(root / "wrong", ca.issue("wrong", ["wrong.example"]))
        started.append(wrong)
        wrong.start()
        broker = PrivateBroker(root / "rabbitmq", tls=good)
        started.append(broker)
        broker.start(timeout_s=60)
        yield TlsServers(ca_file=str(ca.ca_cert), redis=redis_server, broker=broker, wrong_host=wrong)
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="module")
def coordinator(servers: TlsServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A coordinator serving on both TLS servers (open: guest's deltas are taken)."""
    config = CoordinatorConfig(
        auth=AuthMode.OPEN, run=new_run_name("tls"), task_settings=SMALL_TASK,
        commit=CommitConfig(every_updates=2, interval_s=0.3), connection=servers.settings(),
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"), max_seconds=120,
    )
    with serving(config) as coord:
        yield coord


def _join(procs: Processes, name: str, coord: Coordinator, tmp_path: Path, *args: str) -> subprocess.Popen:
    return procs.start(name, "-m", "client.cli", "join", "--run", coord.keys.run, "--client-id", name,
                       "--coordinator-key", coord.signing_key.public_hex,
                       "--state-dir", str(tmp_path / name), *CLIENT_ARGS, *args)


def _one_error_line(procs: Processes, name: str, proc: subprocess.Popen, timeout_s: float = 40) -> str:
    """Wait for ``proc`` to exit 1; return its last line, its one ``error:`` line (nothing retried)."""
    assert proc.wait(timeout=timeout_s) == 1, procs.log(name)
    out = procs.log(name)
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], out
    assert "Traceback" not in out and "retrying" not in out and "reconnecting" not in out, out
    return lines[-1]


def test_a_client_trains_over_rediss_and_amqps_with_the_run_ca(
    servers: TlsServers, coordinator: Coordinator, procs: Processes, tmp_path: Path
) -> None:
    client = _join(procs, "tls-client", coordinator, tmp_path, "--redis", servers.redis.url,
                   "--amqp", servers.broker.url, "--tls-ca", servers.ca_file, "--max-rounds", "2")
    assert client.wait(timeout=60) == 0, procs.log("tls-client")
    out = procs.log("tls-client")
    # each round started from a snapshot read over TLS and verified (hashes, signature)
    assert "round 1  v=" in out and "round 2  v=" in out and "Traceback" not in out, out

    def applied() -> dict | None:  # the status, read back over rediss:// with the CA
        redis_client = connect_redis(servers.settings())
        try:
            doc = read_status(redis_client, coordinator.keys)
        finally:
            redis_client.close()
        clients = {c["client_id"]: c for c in (doc or {}).get("clients", [])}
        return doc if clients.get("tls-client", {}).get("updates", 0) >= 2 else None

    doc = wait_for(applied, 20, "both deltas of the TLS client applied")
    assert doc is not None
    assert doc["deltas"]["rejected_by_reason"] == {}, doc["deltas"]
    # the operator's status command reads Redis and the live queue depth over TLS too
    status = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "status", "--run", coordinator.keys.run, "--json",
         "--redis", servers.redis.url, "--amqp", servers.broker.url, "--tls-ca", servers.ca_file],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["version"] >= doc["version"] and shown["queue"]["depth"] == 0


def test_a_client_that_trusts_only_the_system_cas_is_refused_in_one_line(
    servers: TlsServers, coordinator: Coordinator, procs: Processes, tmp_path: Path
) -> None:
    started = time.monotonic()
    client = _join(procs, "no-ca", coordinator, tmp_path, "--redis", servers.redis.url,
                   "--amqp", servers.broker.url, "--max-rounds", "1")
    line = _one_error_line(procs, "no-ca", client)
    assert line.startswith(f"error: Redis at 127.0.0.1:{servers.redis.port}: TLS certificate refused ("), line
    assert "pass --tls-ca" in line and "guest" not in line
    assert time.monotonic() - started < 40  # refused, not retried


def test_a_broker_certificate_for_another_host_stops_client_and_coordinator_in_one_line(
    servers: TlsServers, coordinator: Coordinator, procs: Processes, tmp_path: Path
) -> None:
    # The "broker" here is the wrong-host TLS port: the handshake, where the name is checked,
    # comes before any AMQP byte, so what is refused is the certificate and nothing else.
    wrong_amqp = f"amqps://guest:guest@127.0.0.1:{servers.wrong_host.port}/%2F"
    client = _join(procs, "wrong-broker", coordinator, tmp_path, "--redis", servers.redis.url,
                   "--amqp", wrong_amqp, "--tls-ca", servers.ca_file, "--max-rounds", "1")
    serve = procs.start(
        "coordinator", "-m", "coordinator.cli", "serve", "--run", new_run_name("tls"), "--auth", "open",
        "--model-size", "tiny", "--task-setting", "max_corpus_bytes=1000000", "--threads", "1",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--max-seconds", "60",
        "--redis", servers.redis.url, "--amqp", wrong_amqp, "--tls-ca", servers.ca_file)
    expected = (f"error: RabbitMQ at 127.0.0.1:{servers.wrong_host.port}: TLS certificate refused: "
                "it is not issued for 127.0.0.1 (")
    # the client reads its snapshot, trains a round, then cannot upload it: the uploader's refusal
    assert _one_error_line(procs, "wrong-broker", client, timeout_s=60).startswith(expected)
    log = procs.log("coordinator")
    assert serve.wait(timeout=60) == 1, log
    assert procs.log("coordinator").strip().splitlines()[-1].startswith(expected), log  # the consumer's
    assert "Traceback" not in procs.log("coordinator")


def test_a_redis_certificate_for_another_host_is_refused_and_either_name_of_the_right_one_works(
    servers: TlsServers,
) -> None:
    wrong = connect_redis(servers.settings(redis_url=servers.wrong_host.url))
    try:
        with pytest.raises(ConfigError, match=f"Redis at 127.0.0.1:{servers.wrong_host.port}: TLS "
                                              "certificate refused: it is not issued for 127.0.0.1"):
            wrong.ping()
    finally:
        wrong.close()
    for host in ("127.0.0.1", "localhost"):  # both names are in the server's certificate
        right = connect_redis(servers.settings(redis_url=f"rediss://{host}:{servers.redis.port}/0"))
        try:
            assert right.ping()
        finally:
            right.close()
        settings = servers.settings(amqp_url=f"amqps://guest:guest@{host}:{servers.broker.port}/%2F")
        open_amqp(settings, amqp_parameters(settings)).close()


def test_plain_urls_to_the_tls_ports_fail_at_once_in_one_line(servers: TlsServers) -> None:
    plain_redis = f"redis://127.0.0.1:{servers.redis.port}/0"
    plain_amqp = f"amqp://guest:guest@127.0.0.1:{servers.broker.port}/%2F"
    started = time.monotonic()
    client = connect_redis(servers.settings(redis_url=plain_redis))
    try:
        with pytest.raises(ConfigError, match=f"Redis at 127.0.0.1:{servers.redis.port} speaks TLS only: "
                                              "use rediss://"):
            client.ping()
    finally:
        client.close()
    settings = servers.settings(amqp_url=plain_amqp)
    with pytest.raises(ConfigError, match=f"RabbitMQ at 127.0.0.1:{servers.broker.port} speaks TLS only: "
                                          "use amqps://") as refused:
        open_amqp(settings, amqp_parameters(settings))
    assert "guest" not in str(refused.value)
    # and the other way round: amqps:// to the shared broker's plain port
    host, port = server_address(AMQP_URL)
    settings = servers.settings(amqp_url=f"amqps://guest:guest@{host}:{port}/%2F")
    with pytest.raises(ConfigError, match=f"RabbitMQ at {host}:{port} does not speak TLS"):
        open_amqp(settings, amqp_parameters(settings))
    assert time.monotonic() - started < 10  # clear refusals, not timeouts

    status = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "status", "--run", "any", "--redis", plain_redis,
         "--amqp", plain_amqp], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and status.stdout == ""
    assert status.stderr.strip() == (f"error: Redis at 127.0.0.1:{servers.redis.port} speaks TLS only: use "
                                     "rediss:// (with --tls-ca if its certificate is not signed by a system "
                                     "CA), not redis://"), status.stderr
