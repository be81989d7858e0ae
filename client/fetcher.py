"""Reads what the coordinator publishes in Redis (snapshot version, snapshots, round plan), patiently.

Every call survives Redis going away: it logs one warning, retries with capped exponential backoff
(:class:`shared.settings.RetryPolicy`) and carries on when Redis is back. A stop request ends any
wait by raising :class:`client.stop.StopRequested`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis

from client.stop import StopRequested
from shared.errors import ServiceUnavailable, SnapshotError, SnapshotMissing
from shared.keys import RunKeys
from shared.protocol import RoundPlan
from shared.settings import ConnectionSettings, RetryPolicy, sleep_interruptibly
from shared.snapshot import Snapshot, SnapshotManifest, SnapshotStore

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# A snapshot that fails its checks may be a reader racing expiry, or corruption; after this many
# tries in a row it is reported as an error instead of being retried forever.
BAD_SNAPSHOT_TRIES = 5


class SnapshotFetcher:
    """Snapshots and round plans of one run, read from Redis with reconnects."""

    def __init__(
        self,
        connection: ConnectionSettings,
        keys: RunKeys,
        *,
        retry: RetryPolicy,
        should_stop: Callable[[], bool],
    ) -> None:
        self.keys = keys
        self.retry = retry
        self.should_stop = should_stop
        self.redis = redis.Redis.from_url(
            connection.redis_url,
            socket_timeout=connection.socket_timeout_s,
            socket_connect_timeout=connection.socket_timeout_s,
            health_check_interval=30,  # seconds; a PING before reusing an idle connection
        )
        self.store = SnapshotStore(self.redis, keys)
        self._down = False  # inside an outage: warn once, not on every retry

    def close(self) -> None:
        self.redis.close()

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying through Redis outages until it works or a stop is asked for."""
        delays = self.retry.delays()
        while True:
            if self.should_stop():
                raise StopRequested()
            try:
                result = operation()
            except REDIS_ERRORS as exc:
                if not self._down:
                    log.warning("Redis unavailable while %s (%s); reconnecting with backoff", what, exc)
                    self._down = True
                else:
                    log.debug("Redis still unavailable while %s: %s", what, exc)
                delay = next(delays, None)
                if delay is None:
                    raise ServiceUnavailable(f"Redis unreachable while {what}: {exc}") from exc
                if sleep_interruptibly(delay, self.should_stop):
                    raise StopRequested() from None
                continue
            if self._down:
                log.info("Redis is back")
                self._down = False
            return result

    def current_version(self) -> int | None:
        """Newest complete snapshot version of the run, or None if there is none yet."""
        return self._call("reading the snapshot version", self.store.current_version)

    def wait_for_version(self, poll_s: float, on_wait: Callable[[], None] | None = None) -> int:
        """Return the current version, polling every ``poll_s`` seconds until there is one.

        ``on_wait`` is called once, the first time there is nothing yet (to tell the user).
        """
        told = False
        while True:
            version = self.current_version()
            if version is not None:
                return version
            if not told and on_wait is not None:
                on_wait()
            told = True
            if sleep_interruptibly(poll_s, self.should_stop):
                raise StopRequested()

    def manifest(self, version: int) -> SnapshotManifest:
        """The manifest of ``version`` (a small read); raises SnapshotError if it is gone or bad."""
        return self._call("reading a manifest", lambda: self.store.read_manifest(version))

    def read_latest(self) -> Snapshot:
        """Read and verify the newest snapshot whole, retrying through expiry races and outages."""
        delays = self.retry.delays()
        failures = 0
        while True:
            try:
                return self._call("reading a snapshot", self.store.read_latest)
            except SnapshotMissing as exc:
                # Expired under us or not there yet: the pointer will name a readable one soon.
                log.debug("snapshot not readable yet: %s", exc)
                last: SnapshotError = exc
            except SnapshotError as exc:
                failures += 1
                if failures >= BAD_SNAPSHOT_TRIES:
                    raise
                log.warning("snapshot failed its checks (%s); trying again", exc)
                last = exc
            delay = next(delays, None)
            if delay is None:
                raise last
            if sleep_interruptibly(delay, self.should_stop):
                raise StopRequested()

    def plan(self) -> RoundPlan | None:
        """The coordinator's current round plan, or None if it has not published one."""
        raw = self._call("reading the round plan", lambda: self.redis.get(self.keys.plan))
        return None if raw is None else RoundPlan.decode(raw)

    def wait_for_plan(self, poll_s: float) -> RoundPlan:
        """Return the round plan, polling every ``poll_s`` seconds until there is one."""
        while True:
            plan = self.plan()
            if plan is not None:
                return plan
            log.info("no round plan for run %r yet; waiting", self.keys.run)
            if sleep_interruptibly(poll_s, self.should_stop):
                raise StopRequested()
