"""Reads what the coordinator publishes in Redis (snapshot version, snapshots, round plan), patiently.

Every call survives Redis going away: it logs one warning, retries with capped exponential backoff
(:class:`shared.settings.RetryPolicy`) and says when Redis is back (both at WARNING, the client's
default level). A mistake that retrying cannot cure (wrong credentials, an unknown host, nothing
listening at first contact, a revoked user: :class:`shared.contact.ServerContact`) raises its
:class:`~shared.errors.PermanentError` instead, as do a run that never shows up and a coordinator
of another protocol version, each after ``run_wait_s``. A stop request ends any wait by raising
:class:`client.stop.StopRequested`. The waits on the coordinator live here too: for the first
snapshot, for the round plan, for a warm start to end (those after a send, for a delta's verdict
and snapshot: :mod:`client.inclusion`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from client.stop import StopRequested
from shared import PROTOCOL_VERSION
from shared.contact import ServerContact
from shared.errors import (
    ConfigError,
    NoSuchRun,
    ProtocolMismatch,
    ServiceUnavailable,
    SnapshotError,
    SnapshotMissing,
    SnapshotOtherProtocol,
    SnapshotUntrusted,
)
from shared.keys import RunKeys
from shared.round_plan import RoundMode, RoundPlan
from shared.settings import REDIS_ERRORS as REDIS_OUTAGES
from shared.settings import RetryPolicy, sleep_interruptibly
from shared.signing import VerifyKey
from shared.snapshot import Snapshot, SnapshotStore
from shared.snapshot_layout import SnapshotManifest
from shared.snapshot_patch import PatchManifest, read_patch_bytes, read_patch_manifest

log = logging.getLogger(__name__)

T = TypeVar("T")

# A socket error outside redis-py's own wrapping is an outage too; a refusal of the credentials
# (NOPERM) or a reply that is not Redis's may be a permanent mistake (ServerContact tells). A
# replica cut off from its primary with replica-serve-stale-data off answers MASTERDOWN: an outage.
REDIS_ERRORS: tuple[type[Exception], ...] = (*REDIS_OUTAGES, OSError, redis.exceptions.NoPermissionError,
                                             redis.exceptions.InvalidResponse,
                                             redis.exceptions.MasterDownError)
# A version read this recently stands for the current one where a second read would tell little
# (the staleness in a round's line, read just after the waits).
RECENT_VERSION_S = 1.5
# A snapshot that fails its checks may be a reader racing expiry, or corruption; after this many
# tries in a row it is reported as an error instead of being retried forever.
BAD_SNAPSHOT_TRIES = 5
MAX_REPORTED = 1000  # distinct refusals remembered (so each is warned about once), then forgotten


class SnapshotFetcher:
    """Snapshots and round plans of one run, read from Redis with reconnects.

    ``redis_client`` (made without ``decode_responses``: snapshots are bytes) belongs to the caller,
    who closes it; give it a ``socket_timeout`` so that a dead server is noticed and retried. It
    may be a read-only replica of the run's Redis (``--snapshot-url``): the fetcher only reads, it
    reads ``current`` and the chunks it names through this one connection (a replica applies the
    chunks before the flip, so it never names a version it lacks), and what it reads is signed.
    A replica behind its primary only serves older versions, each whole.

    Every manifest and plan is checked against ``verify_key``, the coordinator's key that the
    volunteer pinned. One that fails (unsigned, forged, replayed under another version, a chunk off
    its signed hash, or an older version of a run than one already read) is reported once as a
    warning and never used: the fetcher waits, polling every ``poll_s`` seconds, as it would for a
    snapshot not yet published, so a forgery in Redis can neither run anything nor stop training.

    ``contact`` (the Redis URL's :class:`ServerContact`) turns permanent refusals into errors;
    without one every failure is an outage. ``run_wait_s`` (None: for ever) bounds two waits: for
    a run that has never shown up (:class:`NoSuchRun`), and on manifests of another protocol
    version (:class:`ProtocolMismatch`); the envelope's version is not signed, so a forgery in
    Redis can end a client this way only by hiding every genuine snapshot for that long.
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
        contact: ServerContact | None = None,
        run_wait_s: float | None = None,
    ) -> None:
        self.redis = redis_client
        self.keys = keys
        self.retry = retry
        self.should_stop = should_stop
        self.poll_s = poll_s
        self.contact = contact
        self.run_wait_s = run_wait_s
        self.store = SnapshotStore(redis_client, keys, verify_key=verify_key)
        self._down_since: float | None = None  # time.monotonic() an outage began: warned once, not per retry
        self._run_seen = False  # a version, plan or status of the run was seen: it exists
        self._other_protocol_since: float | None = None  # when manifests of another protocol began
        self._reported: set[str] = set()  # refusals already warned about (one line per forgery)
        self._newest: dict[str, int] = {}  # run id -> newest version read whole (rollback guard)
        self._version_read: tuple[float, int | None] = (-math.inf, None)  # (time.monotonic(), version)

    def _refuse(self, what: str) -> None:
        """Warn about a refused manifest or plan, once for each distinct refusal."""
        if what in self._reported:
            log.debug("still refusing: %s", what)
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.clear()
        self._reported.add(what)
        log.warning("%s; waiting for one signed by the coordinator", what)

    def call(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying through Redis outages until it works or a stop is asked for."""
        delays = self.retry.delays()
        while True:
            if self.should_stop():
                raise StopRequested()
            try:
                result = operation()
            except REDIS_ERRORS as exc:
                refusal = self.contact.refusal(exc) if self.contact is not None else None
                if refusal is not None:
                    raise refusal from exc
                if self._down_since is None:
                    log.warning("Redis unavailable while %s (%s); reconnecting with backoff", what, exc)
                    self._down_since = time.monotonic()
                else:
                    log.debug("Redis still unavailable while %s: %s", what, exc)
                delay = next(delays, None)
                if delay is None:
                    raise ServiceUnavailable(f"Redis unreachable while {what}: {exc}") from exc
                if sleep_interruptibly(delay, self.should_stop):
                    raise StopRequested() from None
                continue
            except redis.exceptions.ResponseError as exc:  # e.g. a database index the server lacks
                raise ConfigError(f"Redis refused {what}: {exc}") from exc
            if self.contact is not None:
                self.contact.answered()
            if self._down_since is not None:
                log.warning("Redis is back after %.0f s; carrying on", time.monotonic() - self._down_since)
                self._down_since = None
            return result

    def ping(self) -> None:
        """Reach Redis once (the first contact): a permanent mistake raises at once."""
        self.call("connecting", self.redis.ping)

    def current_version(self, max_age_s: float = 0.0) -> int | None:
        """Newest complete snapshot version of the run, or None if there is none yet; one read
        within the last ``max_age_s`` seconds is answered again without asking Redis."""
        read_at, version = self._version_read
        if time.monotonic() - read_at <= max_age_s:
            return version
        version = self.call("reading the snapshot version", self.store.current_version)
        self._version_read = (time.monotonic(), version)
        return version

    def saw_version(self, version: int) -> None:
        """``version`` was current a moment ago (a verdict just written with it said so): a
        :meth:`current_version` with a ``max_age_s`` answers it without asking Redis."""
        self._version_read = (time.monotonic(), version)

    def wait_for_version(self, poll_s: float, on_wait: Callable[[], None] | None = None) -> int:
        """Return the current version, polling every ``poll_s`` seconds until there is one.

        ``on_wait`` is called once, the first time there is nothing yet (to tell the user). If
        this fetcher never saw anything of the run (no version, plan or status) and ``run_wait_s``
        passes without any, raise :class:`NoSuchRun`; a run seen once is waited for as long as it
        takes (its coordinator restarting, Redis losing its keys).
        """
        told = False
        started = time.monotonic()
        while True:
            version = self.current_version()
            if version is not None:
                self._run_seen = True
                return version
            if (self.run_wait_s and not self._run_seen
                    and time.monotonic() - started >= self.run_wait_s and not self._run_exists()):
                where = "" if self.contact is None else f" at {self.contact.host}:{self.contact.port}"
                raise NoSuchRun(
                    f"no run {self.keys.run!r} in Redis{where}: nothing of it was published in "
                    f"{self.run_wait_s:.0f} s; check the run name (--run or the join token) and the Redis "
                    "URL, or start the run's coordinator first (--run-wait 0 waits for ever)")
            if not told and on_wait is not None:
                on_wait()
            told = True
            if sleep_interruptibly(poll_s, self.should_stop):
                raise StopRequested()

    def _run_exists(self) -> bool:
        """True if the run's plan or status is in Redis (its coordinator has served it)."""
        # One key per EXISTS: in a Redis Cluster the two lie in different slots (CROSSSLOT).
        found = self.call("looking for the run",
                           lambda: self.redis.exists(self.keys.plan) + self.redis.exists(self.keys.status))
        self._run_seen = self._run_seen or bool(found)
        return self._run_seen

    def manifest(self, version: int) -> SnapshotManifest:
        """The manifest of ``version`` (a small read); raises SnapshotError if it is gone or bad."""
        return self.call("reading a manifest", lambda: self.store.read_manifest(version))

    def manifest_if_readable(self, version: int) -> SnapshotManifest | None:
        """The manifest of ``version``, or None if it is gone or not readable (yet): for the waits
        on the coordinator, where the next version will do."""
        try:
            return self.manifest(version)
        except SnapshotError:
            return None

    def read_latest(self) -> Snapshot:
        """Read and verify the newest snapshot whole, retrying through expiry races and outages."""
        delays = self.retry.delays()
        failures = 0
        while True:
            try:
                snapshot = self.call("reading a snapshot", self.store.read_latest)
                self._check_not_older(snapshot.manifest)
                self._other_protocol_since = None
                return snapshot
            except SnapshotUntrusted as exc:
                # Not the coordinator's: wait for the next version (the pointer moves on when the
                # coordinator publishes), never count it as corruption; another protocol's for no
                # longer than run_wait_s.
                if isinstance(exc, SnapshotOtherProtocol):
                    self._check_protocol_wait(exc.theirs)
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

    def read_patches(self, target: SnapshotManifest, *, held: int,
                     held_created_at: float) -> list[tuple[PatchManifest, bytearray]] | None:
        """The patches from version ``held`` (stamped ``held_created_at``) to ``target``, each
        verified, or None where they are not all there, do not chain from the held version to
        ``target``, or would not be smaller than the snapshot: then read it whole. Outages are retried."""
        try:
            patches = self.call("reading snapshot patches",
                                lambda: self._patches(target, held, held_created_at))
        except SnapshotError as exc:
            if isinstance(exc, SnapshotUntrusted):
                self._refuse(str(exc))
            log.debug("no patches to version %d (%s); reading it whole", target.version, exc)
            return None
        if patches is not None:
            self._check_not_older(target)
        return patches

    def _patches(self, target: SnapshotManifest, held: int,
                 held_created_at: float) -> list[tuple[PatchManifest, bytearray]] | None:
        manifests = [read_patch_manifest(self.store, v) for v in range(held + 1, target.version + 1)]
        stamp = held_created_at
        for manifest in manifests:
            if manifest.base_created_at != stamp or manifest.params != manifests[-1].params:
                return None
            stamp = manifest.created_at
        if not manifests[-1].fits(target) or sum(m.total_bytes for m in manifests) >= target.total_bytes:
            return None
        return [(m, read_patch_bytes(self.store, m)) for m in manifests]

    def _check_protocol_wait(self, theirs: int) -> None:
        """Raise :class:`ProtocolMismatch` once manifests of protocol ``theirs`` have been all there
        was for ``run_wait_s``, saying which side needs upgrading."""
        now = time.monotonic()
        if self._other_protocol_since is None:
            self._other_protocol_since = now
        if not self.run_wait_s or now - self._other_protocol_since < self.run_wait_s:
            return
        if theirs > PROTOCOL_VERSION:
            advice = "upgrade asyncloco on this machine (pip install --upgrade asyncloco)"
        else:
            advice = ("the coordinator is older: ask the run's operator to upgrade it, or install the "
                      f"asyncloco release of protocol {theirs} here")
        raise ProtocolMismatch(f"run {self.keys.run!r}: the coordinator speaks protocol {theirs}, this "
                               f"client protocol {PROTOCOL_VERSION}: {advice}")

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
            return self.call("reading the round plan", self.store.read_plan)
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
