"""After a client sends a delta: wait for its verdict and the snapshot that includes it, cheaply.

The coordinator appends each verdict to the client's own Redis stream (:mod:`shared.verdict`); an
applied delta's names the snapshot that first includes it and whether that snapshot's outer buffer
cycle is still open. So the wait is one blocking ``XREAD`` that returns within milliseconds of the
publish. Only when no verdict comes for :data:`VERDICT_BLOCK_S` does the client look at the
snapshot version and, for a new one, its manifest (whose progress lists each client's newest
settled seq): a coordinator whose verdict was lost still lets the wait end, and a new run is seen.

Every command of these waits is paid from one token bucket (:class:`WaitBudget`): at most
:data:`WAIT_COMMANDS_PER_S` a second on average, in bursts of at most three, however many versions
go by. The bucket fills while the client trains, so the first read after a send costs no wait.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import redis

from client.fetcher import SnapshotFetcher
from client.report import DeltaFate
from client.stop import StopRequested
from shared.redis_cluster import socket_timeout_of
from shared.settings import sleep_interruptibly
from shared.verdict import MAX_ENTRIES_READ, Verdict, parse_entries

log = logging.getLogger(__name__)

# While it waits on the coordinator after sending (for its delta's verdict and snapshot, then for
# its buffer cycle to close), a client sends Redis at most this many commands a second on average
# (a blocking read of its verdicts, the version, a new version's manifest), however many versions
# go by. A blocking read counts as one command however long it blocks.
WAIT_COMMANDS_PER_S = 2.0
# One blocking read of the verdicts waits at most this long; then the version is looked at once.
VERDICT_BLOCK_S = 2.0
# After a snapshot is seen to include the delta (without its verdict), how long to wait for the
# verdict still (written with the snapshot, so a lost one: the wait ends without it).
VERDICT_GRACE_S = 1.5
SEEN_KEPT = 64  # verdicts remembered after they were read (client.overlap asks for older ones)


class WaitBudget:
    """The Redis commands of the waits on the coordinator: a token bucket that gains ``per_s`` a
    second and holds at most :attr:`CAPACITY`, so that over any stretch of T seconds a client
    sends at most ``CAPACITY + per_s * T`` of them. It fills while the client trains."""

    CAPACITY = 3.0  # a version and its manifest, and the blocking read after them at once

    def __init__(self, per_s: float, should_stop: Callable[[], bool]) -> None:
        self.per_s = per_s
        self.should_stop = should_stop
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


class InclusionWait:
    """The waits of one client after each send, through ``fetcher`` (its Redis reads and retries)."""

    def __init__(self, fetcher: SnapshotFetcher, client_id: str) -> None:
        self.fetcher = fetcher
        self.client_id = client_id
        self.budget = WaitBudget(WAIT_COMMANDS_PER_S, fetcher.should_stop)
        self._cursor = b"0-0"  # the newest verdict entry read: the next read starts after it
        self._streams = True  # False once the verdict stream cannot be read (a user made before them)
        self._verdicts_expected = True  # False once a snapshot held a delta whose verdict never came
        # (run id, version, cycle still open) of the snapshot that held the last delta waited on
        self._included: tuple[str, int, bool] | None = None
        # every verdict read lately, by (run id, seq): a wait for one delta reads the others' too
        self.seen: dict[tuple[str, int], Verdict] = {}

    # -- the verdict stream -----------------------------------------------------------------------

    def read_verdicts(self, block_s: float) -> list[Verdict]:
        """The verdicts on this client's deltas written since the last read, waiting up to
        ``block_s`` for one (0: not at all); [] where the stream may not be read."""
        if not self._streams:
            return []
        key = self.fetcher.keys.verdicts(self.client_id)
        block_ms = max(1, int(block_s * 1000)) if block_s > 0 else None

        def read() -> object:
            try:
                return self.fetcher.redis.xread({key: self._cursor}, count=MAX_ENTRIES_READ, block=block_ms)
            except (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError) as exc:
                # a Redis user invited before verdict streams, or something else under the key
                log.info("cannot read this client's verdicts (%s); watching the snapshots instead", exc)
                self._streams = False
                return None

        reply = self.fetcher.call("reading verdicts", read)
        entries = _stream_entries(reply, key)
        verdicts, last = parse_entries(entries)
        if last is not None:
            self._cursor = last
        for verdict in verdicts:
            self.seen[(verdict.run_id, verdict.seq)] = verdict
        while len(self.seen) > SEEN_KEPT:
            del self.seen[next(iter(self.seen))]
        return verdicts

    def _block_s(self, deadline: float) -> float:
        """How long one read may block: until ``deadline``, at most :data:`VERDICT_BLOCK_S`, and
        well within the connection's socket timeout (a block past it reads as an outage)."""
        timeout = socket_timeout_of(self.fetcher.redis)
        cap = VERDICT_BLOCK_S if not timeout else min(VERDICT_BLOCK_S, 0.5 * timeout)
        return max(0.0, min(cap, deadline - time.monotonic()))

    # -- the waits --------------------------------------------------------------------------------

    def until_included(self, *, run_id: str, seq: int, base_version: int, within_s: float,
                       sync: bool = False) -> DeltaFate:
        """Wait (bounded by ``within_s``; a synchronous round's as long as its round takes) until
        the coordinator's verdict on delta ``seq`` is in, and with an applied one the snapshot
        that includes it; return what was learnt.

        Starting the next round from a base without our own last delta would make the next delta
        repeat most of it, and Delayed Nesterov would count that work twice. A rejection ends the
        wait at once (no snapshot will include it).
        """
        budget = self.budget
        self._included = None
        deadline = time.monotonic() + (math.inf if sync else within_s)
        included: int | None = None  # seen in a manifest while the verdict had not come
        included_at = 0.0  # time.monotonic() when it was seen
        checked = base_version  # the newest version looked at
        while budget.take(1, deadline):
            verdicts = self.read_verdicts(self._block_s(deadline))
            ours = [v for v in verdicts if (v.run_id, v.seq) == (run_id, seq)]
            if ours:
                verdict = ours[-1]
                if not verdict.applied:
                    return DeltaFate(verdict, None)
                self._verdicts_expected = True
                if verdict.version >= 0:
                    self._included = (run_id, verdict.version, verdict.cycle_open)
                    self.fetcher.saw_version(verdict.version)
                    return DeltaFate(verdict, verdict.version)
                return DeltaFate(verdict, included)
            grace = VERDICT_GRACE_S if self._verdicts_expected and self._streams else 0.0
            if included is not None:
                if time.monotonic() - included_at >= grace:
                    self._verdicts_expected = False  # its verdict was lost: wait no more for one
                    return DeltaFate(None, included)
                if not self._streams:
                    sleep_interruptibly(grace, self.fetcher.should_stop)
                continue
            # No verdict yet: is there a new run, or a snapshot with the delta whose verdict was lost?
            if not budget.take(2, deadline):  # ``current``, and a new version's manifest
                break
            version = self.fetcher.current_version()
            if version is None or version <= checked:
                budget.give_back()
                continue
            checked = version
            manifest = self.fetcher.manifest_if_readable(version)
            if manifest is not None and manifest.run_id != run_id:
                return DeltaFate(None, None)  # a new run: the next round adopts it
            if manifest is not None and (sync or settled_seq(manifest.progress, self.client_id) >= seq):
                included, included_at = version, time.monotonic()
                self._included = (run_id, version, bool(manifest.progress.get("cycle_open", False)))
        log.info("delta %s:%d not yet %s after %.0f s; going on", self.client_id, seq,
                 "in a snapshot" if included is None else "judged", within_s)
        return DeltaFate(None, included)

    def for_cycle_close(self, *, run_id: str, included: int, grace_s: float) -> bool:
        """After our delta is in version ``included``: wait at most ``grace_s`` (the plan's grace
        period) for a version whose manifest says the outer buffer's cycle is closed, so that the
        next round starts from θ with the cycle's momentum step, as every worker of a sync round
        does. True if it closed in time (or a new run began). What the verdict (or the manifest)
        that ended :meth:`until_included` said is not asked again; each newer version's manifest
        is read once."""
        deadline = time.monotonic() + grace_s
        checked = -1
        known, self._included = self._included, None
        if known is not None and known[1] == included:
            if known[0] != run_id or not known[2]:
                return True
            checked = included
        while self.budget.take(2, deadline):  # ``current``, and a new version's manifest
            version = self.fetcher.current_version()
            if version is None or version < included or version == checked:
                self.budget.give_back()
                continue
            checked = version
            manifest = self.fetcher.manifest_if_readable(version)
            if manifest is not None and (manifest.run_id != run_id
                                         or not manifest.progress.get("cycle_open", False)):
                return True
        return False

    def for_newer_base(self, *, run_id: str, last_base: int, poll_s: float,
                       on_notice: Callable[[str], None]) -> None:
        """Wait, however long it takes (until a stop: :class:`StopRequested`), for a version newer
        than ``last_base`` or another run, saying so once. The coordinator takes one delta per
        client per base version (a second is refused ``already_sent``: it would repeat most of
        the first), so a client whose wait for inclusion ran out, or that had none, waits here."""
        fetcher = self.fetcher
        noticed = False
        checked = -1  # the version whose run id was read last (a new run may count from 0 again)
        while True:
            version = fetcher.current_version()
            if version is not None and version > last_base:
                return
            if version is not None and version != checked:
                checked = version
                manifest = fetcher.manifest_if_readable(version)  # None: wait for the next version
                if manifest is not None and manifest.run_id != run_id:
                    return
            if not noticed:
                on_notice(f"waiting for a version newer than {last_base}: the coordinator takes "
                          "one delta per client per version (Ctrl-C to quit)")
                noticed = True
            if sleep_interruptibly(poll_s, fetcher.should_stop):
                raise StopRequested()


def settled_seq(progress: dict[str, object], client_id: str) -> int:
    """The client's newest settled seq that a manifest's progress lists; -1 for none."""
    seqs = progress.get("client_seqs", {})
    seq = seqs.get(client_id, -1) if isinstance(seqs, dict) else -1
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else -1


def _stream_entries(reply: object, key: str) -> object:
    """The entries of ``key`` in an ``XREAD`` reply: ``[[key, entries]]`` (RESP2) or
    ``{key: [entries]}`` (RESP3); None for nothing (the block ran out)."""
    if isinstance(reply, dict):
        found = reply.get(key.encode(), reply.get(key))
        return found[0] if isinstance(found, list) and found and isinstance(found[0], list) else found
    if isinstance(reply, (list, tuple)):
        for item in reply:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                return item[1]
    return None
