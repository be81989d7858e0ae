"""``--snapshot-url``: which Redis a client reads from, and whose credentials it sends there."""

from __future__ import annotations

import pytest

from client.credentials import snapshot_source
from shared.errors import ConfigError

TOKEN_REDIS = "redis://vol-alice:s3cr%2Ft@redis.example.org:6379/2"


def test_without_a_snapshot_url_the_run_redis_is_read() -> None:
    assert snapshot_source(None, TOKEN_REDIS) == TOKEN_REDIS
    assert snapshot_source("", TOKEN_REDIS) == TOKEN_REDIS


def test_a_bare_replica_url_takes_the_run_redis_user_password_and_database() -> None:
    assert (snapshot_source("redis://replica.example.org:6380", TOKEN_REDIS)
            == "redis://vol-alice:s3cr%2Ft@replica.example.org:6380/2")
    assert (snapshot_source("redis://[::1]:6380/", TOKEN_REDIS)
            == "redis://vol-alice:s3cr%2Ft@[::1]:6380/2")


def test_a_replica_url_with_its_own_user_or_database_keeps_them() -> None:
    assert (snapshot_source("redis://reader:pw@replica:6380/5", TOKEN_REDIS)
            == "redis://reader:pw@replica:6380/5")
    assert snapshot_source("redis://:pw@replica:6380", TOKEN_REDIS) == "redis://:pw@replica:6380/2"
    assert snapshot_source("redis://replica:6380", "redis://127.0.0.1:6379") == "redis://replica:6380"


def test_tls_credentials_never_go_to_a_plain_replica() -> None:
    tls = "rediss://vol-alice:pw@redis.example.org:6380/0"
    assert snapshot_source("rediss://replica:6390", tls) == "rediss://vol-alice:pw@replica:6390/0"
    with pytest.raises(ConfigError, match="rediss://"):
        snapshot_source("redis://replica:6390", tls)


@pytest.mark.parametrize("url", ["amqp://replica:5672", "replica:6380", "redis://", "unix:///tmp/r.sock"])
def test_a_snapshot_url_that_is_not_a_redis_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="--snapshot-url"):
        snapshot_source(url, TOKEN_REDIS)
