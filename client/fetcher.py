"""Reads what the coordinator publishes in Redis (snapshot version, snapshots, round plan), patiently.

Every call survives Redis going away: it logs one warning, retries with capped exponential backoff
(:class:`shared.settings.RetryPolicy`) and carries on when Redis is back. A stop request ends any
wait by raising :class:`client.stop.StopRequested`. The waits on the coordinator live here too: for
the first snapshot, for the round plan, for a warm start to end, for a delta to be included.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from client.stop import StopRequested
from shared.errors import ServiceUnavailable, SnapshotError, SnapshotMissing, SnapshotUntrusted
from shared.keys import RunKeys
from shared.protocol import RoundMode, RoundPlan
from shared.settings import REDIS_ERRORS as REDIS_OUTAGES
from shared.settings import RetryPolicy, sleep_interruptibly
from shared.signing import VerifyKey
from shared.snapshot import Snapshot, SnapshotManifest, SnapshotStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# A socket error outside redis-py's own wrapping is an outage too.
REDIS_ERRORS: tuple[type[Exception], ...] = (*REDIS_OUTAGES, OSError)
# A snapshot that fails its checks may be a reader racing expiry, or corruption; after this many
# tries in a row it is reported as an error instead of being retried forever.
BAD_SNAPSHOT_TRIES = 5
MAX_REPORTED = 1000  # distinct refusals remembered (so each is warned about once), then forgotten


class SnapshotFetcher:
    """Snapshots and round plans of one run, read from Redis with reconnects.

    ``redis_client`` (made without ``decode_responses``: snapshots are bytes) belongs to the caller,
    who closes it; give it a ``socket_timeout`` so that a dead server is noticed and retried.

    Every manifest and plan is checked against ``verify_key``, the coordinator's key that the
    volunteer pinned. One that fails (unsigned, forged, replayed under another version, a chunk off
    its signed hash, or an older version of a run than one already read) is reported once as a
    warning and never used: the fetcher waits, polling every ``poll_s`` seconds, as it would for a
    snapshot not yet published, so a forgery in Redis can neither run anything nor stop training.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: RunKeys,
        *,
        retry: RetryPolicy,
        should_stop: Callable[[], bool],
        verify_key: VerifyKey,
        poll_s: float = 1.0,
    ) -> None:
        self.redis = redis_client
        self.keys = keys
        self.retry = retry
        self.should_stop = should_stop
        self.poll_s = poll_s
        self.store = SnapshotStore(redis_client, keys, verify_key=verify_key)
        self._down = False  # inside an outage: warn once, not on every retry
        self._reported: set[str] = set()  # refusals already warned about (one line per forgery)
        self._newest: dict[str, int] = {}  # run id -> newest version read whole (rollback guard)

    def _refuse(self, what: str) -> None:
        """Warn about a refused manifest or plan, once for each distinct refusal."""
        if what in self._reported:
            log.debug("still refusing: %s", what)
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.clear()
        self._reported.add(what)
        log.warning("%s; waiting for one signed by the coordinator", what)

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
                snapshot = self._call("reading a snapshot", self.store.read_latest)
                self._check_not_older(snapshot.manifest)
                return snapshot
            except SnapshotUntrusted as exc:
                # Not the coordinator's: wait for the next version (the pointer moves on when the
                # coordinator publishes), never give up, never count it as corruption.
                self._refuse(str(exc))
                if sleep_interruptibly(self.poll_s, self.should_stop):
                    raise StopRequested() from None
                continue
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

    def _check_not_older(self, manifest: SnapshotManifest) -> None:
        """Refuse a version older than one already read of the same run: ``current`` is not signed,
        so it may have been pointed back at an old (signed) version still in Redis."""
        newest = self._newest.get(manifest.run_id, -1)
        if manifest.version < newest:
            raise SnapshotUntrusted(
                f"snapshot {manifest.version} of run id {manifest.run_id} is older than version "
                f"{newest} that this client already read (a rolled-back pointer); refusing it"
            )
        if len(self._newest) >= MAX_REPORTED:
            self._newest.clear()
        self._newest[manifest.run_id] = manifest.version

    def plan(self) -> RoundPlan | None:
        """The coordinator's current round plan, or None if it has not published one or what Redis
        holds is not signed by the coordinator (reported once, then treated as no plan yet)."""
        try:
            return self._call("reading the round plan", self.store.read_plan)
        except SnapshotError as exc:  # SnapshotUntrusted, or a signed plan this client cannot read
            self._refuse(str(exc))
            return None

    def wait_for_plan(self, poll_s: float) -> RoundPlan:
        """Return the round plan, polling every ``poll_s`` seconds until there is one."""
        while True:
            plan = self.plan()
            if plan is not None:
                return plan
            log.info("no round plan for run %r yet; waiting", self.keys.run)
            if sleep_interruptibly(poll_s, self.should_stop):
                raise StopRequested()

    def wait_while_another_warms_up(
        self, client_id: str, poll_s: float, on_notice: Callable[[str], None]
    ) -> None:
        """Warm start: while the plan names another client to train alone, wait instead of training
        rounds the coordinator would refuse. Raises :class:`StopRequested` on a stop."""
        noticed = False
        while True:
            plan = self.plan()
            if plan is None or plan.mode is not RoundMode.WARM_START or plan.warm_client in ("", client_id):
                return
            if not noticed:
                on_notice(f"warm start: client {plan.warm_client} trains the run's first steps "
                          "alone; this client joins when it is done")
                noticed = True
            if sleep_interruptibly(poll_s, self.should_stop):
                raise StopRequested()

    def wait_until_included(
        self, *, client_id: str, run_id: str, seq: int, base_version: int, within_s: float
    ) -> bool:
        """Wait (bounded by ``within_s``) until a published snapshot includes delta ``seq``.

        The coordinator lists each active client's newest applied seq in the manifest's progress.
        Starting the next round from a base without our own last delta would make the next delta
        repeat most of it, and Delayed Nesterov would count that work twice.
        """
        plan = self.plan()
        # A synchronous round completes only when the slowest client has sent: wait for the next
        # version however long that takes (it follows the round whether or not ours made it).
        sync = plan is not None and plan.mode is RoundMode.SYNC
        deadline = time.monotonic() + (math.inf if sync else within_s)
        while time.monotonic() < deadline and not self.should_stop():
            version = self.current_version()
            if sync and version is not None and version > base_version:
                return True
            if version is not None and version > base_version:
                try:
                    manifest: SnapshotManifest | None = self.manifest(version)
                except SnapshotError:
                    manifest = None
                if manifest is not None and manifest.run_id != run_id:
                    return False  # a new run: the next round adopts it
                seqs = manifest.progress.get("client_seqs", {}) if manifest is not None else {}
                if isinstance(seqs, dict) and int(seqs.get(client_id, -1)) >= seq:
                    return True
            time.sleep(0.05)
        log.info("delta %s:%d not yet in a snapshot after %.0f s; going on", client_id, seq, within_s)
        return False
