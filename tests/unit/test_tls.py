"""TLS settings without servers: the CA file, what the URLs may say, how pika and redis-py are set up,
and how a failure is told apart from an outage. (tests/integration/test_tls.py runs real servers.)"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pika.exceptions
import pytest
import redis
from click.testing import CliRunner, Result

import client.cli
import coordinator.cli
from shared.errors import ConfigError
from shared.settings import ConnectionSettings, amqp_parameters, connect_redis
from shared.tls import RedisConnection, RedisTlsConnection, speaks_tls, tls_refusal
from tests.private_broker import free_port
from tests.tls_servers import ThrowawayCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return ThrowawayCA(tmp_path_factory.mktemp("ca"))


def test_the_ca_file_must_be_a_readable_pem_bundle(tmp_path: Path, ca: ThrowawayCA) -> None:
    assert ConnectionSettings(tls_ca_file=str(ca.ca_cert)).tls_ca_file == str(ca.ca_cert)
    with pytest.raises(ConfigError, match="--tls-ca: no such file: .*missing.pem"):
        ConnectionSettings(tls_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="--tls-ca: no such file"):
        ConnectionSettings(tls_ca_file=str(tmp_path))  # a folder
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM CA certificate"):
        ConnectionSettings(tls_ca_file=str(tmp_path / "notes.txt"))
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "secret.pem"
        unreadable.write_bytes(ca.ca_cert.read_bytes())
        unreadable.chmod(0)
        with pytest.raises(ConfigError, match="cannot read"):
            ConnectionSettings(tls_ca_file=str(unreadable))


@pytest.mark.parametrize("url_field, url", [
    ("redis_url", "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none"),
    ("redis_url", "rediss://127.0.0.1:6380/0?ssl_check_hostname=false"),
    ("amqp_url", "amqps://u:p@127.0.0.1:5671/%2F?ssl_options=None"),
    ("amqp_url", "amqp://u:p@127.0.0.1:5672/%2F?ssl_options={'protocol':2}"),
])
def test_a_url_cannot_switch_the_certificate_check_off(url_field: str, url: str) -> None:
    with pytest.raises(ConfigError, match="TLS options do not go in the URL; use .*s:// and --tls-ca"):
        ConnectionSettings(redis_url=url) if url_field == "redis_url" else ConnectionSettings(amqp_url=url)


def test_amqps_verifies_the_certificate_and_the_host_name_against_the_ca(ca: ThrowawayCA) -> None:
    params = amqp_parameters(ConnectionSettings(amqp_url="amqps://u:p@broker.example:5671/%2F",
                                                tls_ca_file=str(ca.ca_cert)))
    assert params.ssl_options is not None and params.port == 5671
    context = params.ssl_options.context
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert params.ssl_options.server_hostname == "broker.example"
    trusted = [dict(item[0] for item in cert["subject"]) for cert in context.get_ca_certs()]
    assert {"commonName": "asyncloco throwaway test CA"} in trusted
    # the default port of amqps, and no TLS at all for amqp://
    assert amqp_parameters(ConnectionSettings(amqp_url="amqps://u:p@h/%2F")).port == 5671
    assert amqp_parameters(ConnectionSettings(amqp_url="amqp://u:p@h/%2F")).ssl_options is None


def test_a_malformed_amqp_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--amqp: bad URL"):
        amqp_parameters(ConnectionSettings(amqp_url="amqp://u:p@h:5672/%2F?heartbeat=often"))


def test_rediss_makes_redis_py_require_a_certificate_for_the_host(ca: ThrowawayCA) -> None:
    client = connect_redis(ConnectionSettings(redis_url="rediss://cache.example:6380/2",
                                              tls_ca_file=str(ca.ca_cert)))
    try:
        pool = client.connection_pool
        assert pool.connection_class is RedisTlsConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == ("required", True)
        assert kwargs["ssl_ca_certs"] == str(ca.ca_cert)
        assert (kwargs["host"], kwargs["port"]) == ("cache.example", 6380)
    finally:
        client.close()
    plain = connect_redis(ConnectionSettings(redis_url="redis://127.0.0.1:6379/0"))
    try:
        assert plain.connection_pool.connection_class is RedisConnection
        assert "ssl_ca_certs" not in plain.connection_pool.connection_kwargs
    finally:
        plain.close()


def _certificate_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_message = message
    return error


def test_a_refused_certificate_is_a_config_error_that_names_the_server_but_no_password() -> None:
    # redis-py raises its ConnectionError inside the handler of the SSL error (its __context__)
    redis_error = redis.exceptions.ConnectionError("Error 1 connecting to cache.example:6380.")
    redis_error.__context__ = _certificate_error("unable to get local issuer certificate")
    refusal = tls_refusal(redis_error, "rediss://:hunter2@cache.example:6380/0")
    assert refusal is not None
    assert str(refusal) == ("Redis at cache.example:6380: TLS certificate refused (unable to get local "
                            "issuer certificate); pass --tls-ca with the CA bundle that signed the server's "
                            "certificate")
    # pika carries the socket error as an argument of AMQPConnectionError
    pika_error = pika.exceptions.AMQPConnectionError(
        _certificate_error("Hostname mismatch, certificate is not valid for 'mq.example'."))
    refusal = tls_refusal(pika_error, "amqps://volunteer:s3cret@mq.example/%2F")
    assert refusal is not None and "s3cret" not in str(refusal)
    assert str(refusal).startswith("RabbitMQ at mq.example:5671: TLS certificate refused: it is not issued "
                                   "for mq.example (Hostname mismatch")
    expired = tls_refusal(_certificate_error("certificate has expired"), "rediss://[::1]:6380/0")
    assert str(expired) == ("Redis at ::1:6380: TLS certificate refused (certificate has expired); the "
                            "server needs a current certificate (or this machine's clock is wrong)")


def test_plain_text_behind_a_tls_url_is_a_config_error() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    refusal = tls_refusal(error, "amqps://u:p@127.0.0.1:5672/%2F")
    assert refusal is not None and "does not speak TLS (WRONG_VERSION_NUMBER)" in str(refusal)


def test_an_outage_is_not_a_refusal() -> None:
    port = free_port()  # nothing listens
    for error in (ConnectionRefusedError(111, "Connection refused"), TimeoutError("timed out"),
                  pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, "refused")),
                  ssl.SSLEOFError(8, "EOF occurred in violation of protocol")):
        for url in (f"redis://127.0.0.1:{port}/0", f"rediss://127.0.0.1:{port}/0",
                    f"amqp://u:p@127.0.0.1:{port}/%2F", f"amqps://u:p@127.0.0.1:{port}/%2F"):
            assert tls_refusal(error, url) is None, (error, url)
    # a dropped plain connection is probed: nothing speaks TLS there, so it is an outage too
    assert tls_refusal(ConnectionResetError(104, "reset"), f"redis://127.0.0.1:{port}/0") is None
    assert not speaks_tls("127.0.0.1", port)


def _one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.mark.parametrize("command", [["status"], ["delete-run", "r1", "--yes"], ["serve", "--auth", "open"]])
def test_the_coordinator_commands_take_tls_ca_and_refuse_a_bad_one_in_one_line(
    command: list[str], tmp_path: Path
) -> None:
    where = ["--checkpoint-dir", str(tmp_path / "ckpt")] if command[0] == "serve" else []  # its key file
    result = CliRunner().invoke(coordinator.cli.main,
                                [*command, *where, "--tls-ca", str(tmp_path / "nope.pem")],
                                prog_name="asyncloco-coordinator", env={})
    _one_line_error(result, f"--tls-ca: no such file: {tmp_path / 'nope.pem'}")
    option = {p.name: p for p in coordinator.cli.main.commands[command[0]].params}["tls_ca"]
    assert option.envvar == "ASYNCLOCO_TLS_CA"


def test_the_client_takes_tls_ca_from_the_environment_and_refuses_a_bad_one_in_one_line(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(client.cli.main, ["join", "--state-dir", str(tmp_path)],
                                prog_name="asyncloco-client",
                                env={"ASYNCLOCO_TLS_CA": str(tmp_path / "missing-ca.pem")})
    _one_line_error(result, "--tls-ca: no such file")
    assert not list(tmp_path.iterdir())  # refused before the state dir was touched
