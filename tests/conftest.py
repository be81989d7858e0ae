"""Fixtures for every test folder. Tests under integration/, e2e/ and faults/ talk to the real
Redis and RabbitMQ on 127.0.0.1, started (or installed) once per session if they are not running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.processes import REDIS_URL, Processes, ensure_services
from tests.services import FakeCoordinator, run_scope, stand_in_coordinator

SERVER_FOLDERS = ("integration", "e2e", "faults")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent.name in SERVER_FOLDERS:
            item.add_marker(pytest.mark.usefixtures("real_services"))


@pytest.fixture(scope="session")
def real_services() -> None:
    ensure_services()


@pytest.fixture
def fake_service(monkeypatch: pytest.MonkeyPatch) -> list[FakeCoordinator]:
    """``serve`` builds a stand-in coordinator that records its config (tests of the CLI)."""
    return stand_in_coordinator(monkeypatch)


@pytest.fixture
def run_name() -> Iterator[str]:
    """A fresh run name; its Redis keys and AMQP queues are deleted afterwards."""
    with run_scope() as run:
        yield run


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes a test starts; exactly those are stopped afterwards (by their own handles)."""
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
