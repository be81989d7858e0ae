"""What a failure to reach a server means, without servers: a permanent mistake (its own exit code,
one line) or an outage; and `--version` on both command lines."""

from __future__ import annotations

import socket

import click
import pika.exceptions
import pytest
import redis
from click.testing import CliRunner
from pika.adapters.utils.connection_workflow import AMQPConnectorSocketConnectError, AMQPConnectorStackTimeout

import client.cli
import coordinator.cli
from shared import PROTOCOL_VERSION
from shared.cli import OneLineErrors, version_text
from shared.contact import ServerContact
from shared.errors import (
    PERMANENT_ERRORS,
    AccessRefused,
    AsyncLocoError,
    NoService,
    PermanentError,
    Revoked,
    UnknownHost,
)

REDIS = "redis://alice:secret@redis.example.org:6380/0"
AMQP = "amqp://alice:secret@broker.example.org/%2F"


def _redis_error(cause: BaseException, kind: type[Exception] = redis.exceptions.ConnectionError) -> Exception:
    """What redis-py raises: its own error, raised while handling the socket's."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise kind("network error") from exc
    except Exception as wrapped:
        return wrapped


def _amqp_refused() -> Exception:
    """What pika raises when nothing listens: the socket error two wrappers deep."""
    refused = AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "Connection refused"))
    return pika.exceptions.AMQPConnectionError(refused)


@pytest.mark.parametrize(("url", "exc", "expected", "fragment"), [
    (REDIS, redis.exceptions.AuthenticationError("invalid username-password pair"), AccessRefused,
     "Redis at redis.example.org:6380 refused user 'alice' (invalid username-password pair): check"),
    ("redis://h:1/0", redis.exceptions.AuthenticationError("Authentication required."), AccessRefused,
     "refused this client (no user in the URL) (Authentication required.)"),
    (REDIS, redis.exceptions.NoPermissionError("NOPERM no permissions"), AccessRefused, "NOPERM"),
    (AMQP, pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"), AccessRefused,
     "RabbitMQ at broker.example.org:5672 refused user 'alice' (ACCESS_REFUSED"),
    (AMQP, pika.exceptions.ProbableAccessDeniedError("NOT_ALLOWED - vhost x not found"), AccessRefused,
     "the virtual host"),
    (REDIS, _redis_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known")), UnknownHost,
     "unknown host 'redis.example.org' for Redis (Name or service not known): check the host name in the "
     "join token or --redis"),
    (AMQP, socket.gaierror(socket.EAI_NONAME, "Name or service not known"), UnknownHost, "--amqp"),
    (REDIS, _redis_error(ConnectionRefusedError(111, "Connection refused")), NoService,
     "nothing listens at redis.example.org:6380 for Redis (connection refused)"),
    (AMQP, _amqp_refused(), NoService, "nothing listens at broker.example.org:5672 for RabbitMQ"),
    (AMQP, AMQPConnectorStackTimeout("no handshake"), NoService, "answers, but not as RabbitMQ"),
    (REDIS, redis.exceptions.InvalidResponse("Protocol error"), NoService, "answers, but not as Redis"),
])
def test_a_first_contact_that_can_never_work_is_a_permanent_mistake(
    url: str, exc: Exception, expected: type[PermanentError], fragment: str
) -> None:
    refusal = ServerContact(url, option="--amqp" if url.startswith("amqp") else "--redis").refusal(exc)
    assert type(refusal) is expected
    assert fragment in str(refusal) and "secret" not in str(refusal)
    assert "\n" not in str(refusal)


@pytest.mark.parametrize("exc", [
    _redis_error(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")),  # DNS down
    _redis_error(TimeoutError("timed out")),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    pika.exceptions.ProbableAccessDeniedError("NOT_ALLOWED - user connection limit (2) is reached"),
])
def test_what_may_pass_is_an_outage_even_at_first_contact(exc: Exception) -> None:
    assert ServerContact(REDIS, option="--redis").refusal(exc) is None


def test_after_the_server_answered_only_a_refusal_of_the_credentials_is_permanent_and_it_is_a_revocation(
) -> None:
    contact = ServerContact(REDIS, option="--redis")
    contact.answered()
    for outage in (_redis_error(ConnectionRefusedError(111, "refused")),
                   _redis_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
                   redis.exceptions.InvalidResponse("Protocol error")):
        assert contact.refusal(outage) is None  # it was there: it went away, and will come back
    revoked = contact.refusal(redis.exceptions.AuthenticationError("invalid username-password pair"))
    assert isinstance(revoked, Revoked)
    assert "no longer lets user 'alice' in" in str(revoked) and "new join token" in str(revoked)


def test_every_permanent_mistake_has_its_own_exit_code_outside_the_usual_ones() -> None:
    codes = [error.exit_code for error in PERMANENT_ERRORS]
    assert sorted(codes) == [66, 67, 68, 69, 76, 77]
    assert AsyncLocoError("x").exit_code == 1


@pytest.mark.parametrize("error", [*PERMANENT_ERRORS, AsyncLocoError])
def test_a_command_ends_an_error_in_one_line_with_its_exit_code(error: type[AsyncLocoError]) -> None:
    @click.group(cls=OneLineErrors)
    def main() -> None:
        pass

    @main.command()
    def go() -> None:
        raise error("the whole story, in one line")

    result = CliRunner().invoke(main, ["go"])
    assert result.exit_code == error.exit_code
    assert result.stderr == "error: the whole story, in one line\n"
    assert "Traceback" not in result.output


def test_the_client_and_the_coordinator_say_their_version_and_the_protocols() -> None:
    assert version_text().endswith(f" (protocol {PROTOCOL_VERSION})")
    groups = (("asyncloco-client", client.cli.main), ("asyncloco-coordinator", coordinator.cli.main))
    for name, group in groups:
        result = CliRunner().invoke(group, ["--version"], prog_name=name)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{name} {version_text()}\n"


def test_the_client_documents_its_exit_codes() -> None:
    text = (client.cli.__doc__ or "") + (client.cli.main.help or "")
    for error in PERMANENT_ERRORS:
        assert f" {error.exit_code} " in text, error
