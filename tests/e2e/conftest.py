from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.services import REDIS_URL, ensure_services, run_scope


@pytest.fixture(scope="session", autouse=True)
def _services() -> None:
    ensure_services()


@pytest.fixture
def run_name() -> Iterator[str]:
    with run_scope() as run:
        yield run


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        client.close()
