"""Reads what the coordinator publishes in Redis (snapshot version, snapshots, round plan), patiently.

Every call survives Redis going away: it logs one warning, retries with capped exponential backoff
(:class:`shared.settings.RetryPolicy`) and says when Redis is back (both at WARNING, the client's
default level). A mistake that retrying cannot cure (wrong credentials, an unknown host, nothing
listening at first contact, a revoked user: :class:`shared.contact.ServerContact`) raises its
:class:`~shared.errors.PermanentError` instead, as do a run that never shows up and a coordinator
of another protocol version, each after ``run_wait_s``. A stop request ends any wait by raising
:class:`client.stop.StopRequested`. The waits on the coordinator live here too: for the first
snapshot, for the round plan, for a warm start to end, for a delta's verdict and snapshot.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from client.report import DeltaFate
from client.stop import StopRequested
from shared import PROTOCOL_VERSION
from shared.contact import ServerContact
from shared.errors import (
    ConfigError,
    NoSuchRun,
    ProtocolError,
    ProtocolMismatch,
    ServiceUnavailable,
    SnapshotError,
    SnapshotMissing,
    SnapshotOtherProtocol,
    SnapshotUntrusted,
)
from shared.keys import RunKeys
from shared.protocol import RoundMode, RoundPlan
from shared.settings import REDIS_ERRORS as REDIS_OUTAGES
from shared.settings import RetryPolicy, redis_bytes, sleep_interruptibly
from shared.signing import VerifyKey
from shared.snapshot import Snapshot, SnapshotManifest, SnapshotStore
from shared.verdict import Verdict

log = logging.getLogger(__name__)

T = TypeVar("T")

# A socket error outside redis-py's own wrapping is an outage too; a refusal of the credentials
# (NOPERM) or a reply that is not Redis's may be a permanent mistake (ServerContact tells). A
# replica cut off from its primary with replica-serve-stale-data off answers MASTERDOWN: an outage.
REDIS_ERRORS: tuple[type[Exception], ...] = (*REDIS_OUTAGES, OSError, redis.exceptions.NoPermissionError,
                                             redis.exceptions.InvalidResponse,
                                             redis.exceptions.MasterDownError)
# After a snapshot includes a delta, how long to wait for its verdict (written with the snapshot,
# or at the coordinator's next housekeeping pass, every second).
VERDICT_GRACE_S = 1.5
# While it waits on the coordinator after sending (for its delta's verdict and snapshot, then for
# its buffer cycle to close), a client sends Redis at most this many commands for each second of the
# wait (small GETs: the version, the verdict, a new version's manifest), however many versions go by.
# Raise it and a client notices its delta's snapshot sooner, at more cost to Redis per waiting client.
WAIT_COMMANDS_PER_S = 2.0
# A version read this recently stands for the current one where a second read would tell little
# (the staleness in a round's line, read just after the waits).
RECENT_VERSION_S = 1.5
# A snapshot that fails its checks may be a reader racing expiry, or corruption; after this many
# tries in a row it is reported as an error instead of being retried forever.
BAD_SNAPSHOT_TRIES = 5
MAX_REPORTED = 1000  # distinct refusals remembered (so each is warned about once), then forgotten


class WaitBudget:
    """The Redis commands of a wait on the coordinator: at most ``per_s`` of them for each second
    since :meth:`restart` (a token bucket that starts empty and holds at most
    :attr:`CAPACITY`), so that over any wait, however short, the rate stays within ``per_s``."""

    CAPACITY = 2.0  # a version and its manifest, read one after the other

    def __init__(self, per_s: float, should_stop: Callable[[], bool]) -> None:
        self.per_s = per_s
        self.should_stop = should_stop
        self.restart()

    def restart(self) -> None:
        """A new wait begins: nothing spent yet, nothing saved up."""
        self._tokens, self._at = 0.0, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.CAPACITY, self._tokens + (now - self._at) * self.per_s)
        self._at = now

    def take(self, commands: int, deadline: float = math.inf) -> bool:
        """Sleep until ``commands`` may be sent, and count them as sent; False instead (nothing
        counted) once ``deadline`` (a ``time.monotonic()``) comes first, or a stop is asked for."""
        self._refill()
        ready_at = time.monotonic() + max(0.0, commands - self._tokens) / self.per_s
        if ready_at > deadline:
            sleep_interruptibly(deadline - time.monotonic(), self.should_stop)
            return False
        if sleep_interruptibly(ready_at - time.monotonic(), self.should_stop):
            return False
        self._refill()
        self._tokens -= commands
        return True

    def give_back(self, commands: int = 1) -> None:
        """``commands`` taken were not sent after all (no manifest to read after ``current``)."""
        self._tokens += commands


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
        # False once a snapshot held a delta whose verdict never came: a coordinator from before them
        self._verdicts_expected = True
        self._reported: set[str] = set()  # refusals already warned about (one line per forgery)
        self._newest: dict[str, int] = {}  # run id -> newest version read whole (rollback guard)
        self._wait_budget = WaitBudget(WAIT_COMMANDS_PER_S, should_stop)  # of the waits after a send
        self._included_in: SnapshotManifest | None = None  # the manifest that held the last delta waited on
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

    def _call(self, what: str, operation: Callable[[], T]) -> T:
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
        self._call("connecting", self.redis.ping)

    def current_version(self, max_age_s: float = 0.0) -> int | None:
        """Newest complete snapshot version of the run, or None if there is none yet; one read
        within the last ``max_age_s`` seconds is answered again without asking Redis."""
        read_at, version = self._version_read
        if time.monotonic() - read_at <= max_age_s:
            return version
        version = self._call("reading the snapshot version", self.store.current_version)
        self._version_read = (time.monotonic(), version)
        return version

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
        found = self._call("looking for the run",
                           lambda: self.redis.exists(self.keys.plan) + self.redis.exists(self.keys.status))
        self._run_seen = self._run_seen or bool(found)
        return self._run_seen

    def manifest(self, version: int) -> SnapshotManifest:
        """The manifest of ``version`` (a small read); raises SnapshotError if it is gone or bad."""
        return self._call("reading a manifest", lambda: self.store.read_manifest(version))

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
                snapshot = self._call("reading a snapshot", self.store.read_latest)
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

    def verdict(self, client_id: str) -> Verdict | None:
        """The coordinator's verdict on this client's newest judged delta, or None if there is none
        (not judged yet, a coordinator from before verdicts, an invitation whose Redis user may
        not read them, or one that does not parse)."""

        def read() -> bytes | None:
            try:
                return redis_bytes(self.redis.get(self.keys.verdict(client_id)))
            except redis.exceptions.NoPermissionError:
                return None  # invited before verdicts were published: its user may not read them

        raw = self._call("reading a verdict", read)
        if raw is None:
            return None
        try:
            found = Verdict.decode(raw)
        except ProtocolError as exc:
            log.debug("unreadable verdict for %s: %s", client_id, exc)
            return None
        self._verdicts_expected = True
        return found

    def wait_for_cycle_close(self, *, run_id: str, included: int, grace_s: float) -> bool:
        """After our delta is in version ``included``: wait at most ``grace_s`` (the plan's grace
        period) for a version whose manifest says the outer buffer's cycle is closed, so that the
        next round starts from θ with the cycle's momentum step, as every worker of a sync round
        does. True if it closed in time (or a new run began); each version's manifest is read once,
        and the one :meth:`wait_until_included` found the delta in is not read again. Within the
        budget of the waits after a send (:data:`WAIT_COMMANDS_PER_S`).
        """
        deadline = time.monotonic() + grace_s
        checked = -1
        known, self._included_in = self._included_in, None
        if known is not None and known.version == included:
            if known.run_id != run_id or not known.progress.get("cycle_open", False):
                return True
            checked = included
        while self._wait_budget.take(2, deadline):  # ``current``, and a new version's manifest
            version = self.current_version()
            if version is None or version < included or version == checked:
                self._wait_budget.give_back()
                continue
            checked = version
            manifest = self.manifest_if_readable(version)
            if manifest is not None and (manifest.run_id != run_id
                                         or not manifest.progress.get("cycle_open", False)):
                return True
        return False

    def wait_until_included(
        self, *, client_id: str, run_id: str, seq: int, base_version: int, within_s: float,
        sync: bool | None = None,
    ) -> DeltaFate:
        """Wait (bounded by ``within_s``) until a published snapshot includes delta ``seq`` and the
        coordinator's verdict on it is in; return what was learnt.

        The coordinator lists each active client's newest settled seq in the manifest's progress.
        Starting the next round from a base without our own last delta would make the next delta
        repeat most of it, and Delayed Nesterov would count that work twice. A rejection ends the
        wait at once (no snapshot will include it); a coordinator that writes no verdicts costs
        :data:`VERDICT_GRACE_S` once.

        At most :data:`WAIT_COMMANDS_PER_S` Redis commands a second of waiting: ``current`` and
        the verdict in turn (then only the one still missing), and each newer version's manifest
        once, read as soon as ``current`` names it. ``sync``: whether the run's rounds are
        synchronous (None: read the plan to tell).
        """
        budget = self._wait_budget
        budget.restart()
        self._included_in = None
        if sync is None:
            plan = self.plan() if budget.take(1) else None
            sync = plan is not None and plan.mode is RoundMode.SYNC
        # A synchronous round completes only when the slowest client has sent: wait for the next
        # version however long that takes (it follows the round whether or not ours made it).
        deadline = time.monotonic() + (math.inf if sync else within_s)
        included: int | None = None  # the first version after the base that holds it
        included_at = 0.0  # time.monotonic() when it was seen
        verdict: Verdict | None = None
        checked = base_version  # the newest version looked at (none after the base yet)
        verdict_next = False  # whose turn it is while both are unknown: the version's first
        while True:
            if verdict is None and (included is not None or verdict_next):
                if not budget.take(1, deadline):
                    break
                verdict_next = False
                found = self.verdict(client_id)
                if found is not None and (found.run_id, found.seq) == (run_id, seq):
                    verdict = found
            else:
                if not budget.take(2, deadline):  # ``current``, and a new version's manifest
                    break
                verdict_next = True
                version = self.current_version()
                if version is None or version <= checked:
                    budget.give_back()
                else:
                    checked = version
                    manifest = self.manifest_if_readable(version)
                    if manifest is not None and manifest.run_id != run_id:
                        return DeltaFate(verdict, None)  # a new run: the next round adopts it
                    seqs = manifest.progress.get("client_seqs", {}) if manifest is not None else {}
                    if sync or (isinstance(seqs, dict) and int(seqs.get(client_id, -1)) >= seq):
                        included, included_at = version, time.monotonic()
                        self._included_in = manifest
            if verdict is not None and (not verdict.applied or included is not None):
                return DeltaFate(verdict, included)
            # The verdict is written just after the snapshot: looked for this long after it.
            grace = VERDICT_GRACE_S if self._verdicts_expected else 0.0
            if included is not None and time.monotonic() - included_at >= grace:
                self._verdicts_expected = False  # a coordinator that writes none: wait no more
                return DeltaFate(verdict, included)
        if verdict is None or included is None:
            log.info("delta %s:%d not yet %s after %.0f s; going on", client_id, seq,
                     "judged" if verdict is None else "in a snapshot", within_s)
        return DeltaFate(verdict, included)
