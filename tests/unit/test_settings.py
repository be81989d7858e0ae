"""Connection settings and the retry policy."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from shared.errors import ConfigError
from shared.settings import ConnectionSettings, RetryPolicy, sleep_interruptibly


def test_delays_grow_then_cap() -> None:
    policy = RetryPolicy(initial_delay_s=0.5, max_delay_s=4.0, multiplier=2.0)
    delays = list(itertools.islice(policy.delays(random.Random(1)), 40))
    assert len(delays) == 40  # no give_up_after_s: retries forever
    # full jitter within [ceiling/2, ceiling] and ceilings 0.5, 1, 2, 4, 4, ...
    ceilings = [min(4.0, 0.5 * 2.0**i) for i in range(40)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 4.0
    assert sum(delays[-10:]) / 10 > 2 * sum(delays[:2]) / 2  # it does grow


def test_delays_are_jittered() -> None:
    policy = RetryPolicy()
    first = list(itertools.islice(policy.delays(random.Random(1)), 5))
    second = list(itertools.islice(policy.delays(random.Random(2)), 5))
    assert first != second
    assert first == list(itertools.islice(policy.delays(random.Random(1)), 5))


def test_delays_respect_give_up_after() -> None:
    policy = RetryPolicy(initial_delay_s=0.5, max_delay_s=2.0, give_up_after_s=10.0)
    for seed in range(20):
        delays = list(policy.delays(random.Random(seed)))
        assert 0 < len(delays) < 30
        assert sum(delays) <= 10.0
        # it gives up only when one more (at least half-ceiling) sleep would pass the limit
        assert sum(delays) > 10.0 - 2.0


def test_give_up_before_the_first_delay() -> None:
    assert list(RetryPolicy(initial_delay_s=1.0, give_up_after_s=0.1).delays(random.Random(0))) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay_s": 0},
        {"initial_delay_s": -1},
        {"initial_delay_s": 5.0, "max_delay_s": 1.0},
        {"multiplier": 0.5},
    ],
)
def test_retry_policy_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "amqp://localhost", ""])
def test_connection_settings_reject_non_redis_url(url: str) -> None:
    with pytest.raises(ConfigError, match="--redis"):
        ConnectionSettings(redis_url=url)


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://h:6380/2", "unix:///tmp/redis.sock"])
def test_connection_settings_accept_redis_urls(url: str) -> None:
    assert ConnectionSettings(redis_url=url).redis_url == url


def test_connection_settings_reject_non_amqp_url() -> None:
    with pytest.raises(ConfigError, match="--amqp"):
        ConnectionSettings(amqp_url="redis://127.0.0.1:6379/0")
    assert ConnectionSettings(amqp_url="amqps://u:p@h/vh").amqp_url.startswith("amqps")


def test_sleep_interruptibly() -> None:
    start = time.monotonic()
    assert sleep_interruptibly(5.0, lambda: True) is True
    assert sleep_interruptibly(0.05) is False
    assert time.monotonic() - start < 1.0
