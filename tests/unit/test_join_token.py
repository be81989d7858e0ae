"""The join token: what `invite` prints and `join` reads."""

from __future__ import annotations

import pytest

from coordinator.invites import with_credentials
from shared.errors import ConfigError
from shared.join_token import PREFIX, JoinToken

KEY = "ab" * 32


def _token(**overrides: str) -> JoinToken:
    fields = dict(run="r1", client_id="alice", redis="redis://u:p@h:6379/0",
                  amqp="amqp://u:p@h:5672/r1", coordinator_key=KEY)
    fields.update(overrides)
    return JoinToken(**fields)


def test_round_trip_and_whitespace_around_it() -> None:
    token = _token()
    text = token.encode()
    assert text.startswith(PREFIX) and "alice" not in text  # opaque, one word
    assert JoinToken.decode(f"  {text}\n") == token


@pytest.mark.parametrize("text", ["", "hello", PREFIX, PREFIX + "!!!", PREFIX + "e30", PREFIX + "x" * 9000])
def test_anything_else_is_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        JoinToken.decode(text)
    assert "\n" not in str(info.value) and "p@h" not in str(info.value)


@pytest.mark.parametrize("field, value", [("coordinator_key", "zz" * 32), ("coordinator_key", "ab"),
                                          ("client_id", "a b"), ("run", "no/slash"), ("redis", "nourl")])
def test_bad_fields_are_refused(field: str, value: str) -> None:
    with pytest.raises(ConfigError):
        _token(**{field: value})


def test_credentials_are_replaced_and_quoted() -> None:
    url = with_credentials("amqps://coord:secret@broker.example:5671/myrun?heartbeat=30",
                           "asyncloco.r.a", "p/w@")
    assert url == "amqps://asyncloco.r.a:p%2Fw%40@broker.example:5671/myrun?heartbeat=30"
    assert with_credentials("redis://127.0.0.1:6379/0", "u", "p") == "redis://u:p@127.0.0.1:6379/0"
    assert with_credentials("redis://[::1]:6379/0", "u", "p") == "redis://u:p@[::1]:6379/0"
