"""Deltas too big for one broker message: their parts wait in a spool on disk until all are in.

Why on disk, and not unacked in the broker: while a big delta's parts arrive, other clients' parts
interleave with them. Held unacked, they would fill the prefetch window and the queue's byte bound,
and a delta could then never complete. So each part is written to ``DIR/<client>~<seq>/`` (fsynced,
renamed into place) and acked at once: from then on the spool holds it, across crashes.

When the last part is in, the delta is put together, its SHA-256 checked, and it is handled like any
other delta. Its directory is removed only after the commit that settles it. A crash in between
finds it whole on restart and handles it again; the (client id, seq) de-duplication drops it if
that commit had landed. A delta whose parts stop coming is discarded ``timeout_s`` after its
newest part, and one still incomplete ``deadline_s`` after its *first* part is discarded however
often parts arrive (reason ``incomplete``); parts that turn up later are duplicates of a settled
delta.

Bounds, all judged at a delta's first part: the ``total_bytes`` it declares must not exceed what
this model can encode to (:func:`delta_bytes_bound`: ``too_large``); it then reserves all of them
(so a delta that started can always finish), within its sender's quota (``client_quota_bytes``,
by default twice that bound: ``spool_quota``) and the spool's ``max_bytes`` (``spool_full``); one
client has at most ``max_pending_per_client`` deltas in the spool (``too_many_pending``); and the
first part costs the sender one delta of its rate limit (``rate_limited``,
:class:`coordinator.admission.RateLimit`), the later parts nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.admission import FirstPartRule
from coordinator.intake import DeltaIntake
from coordinator.outcome import Outcome, OutcomeKind
from shared.delta_parts import DeltaPart
from shared.errors import ConfigError, ProtocolError
from shared.files import fsync_directory, make_directory, write_atomically

log = logging.getLogger(__name__)

GiB = 1024**3
META = "meta.json"


@dataclass(frozen=True)
class SpoolConfig:
    """``timeout_s``: how long after its newest part an incomplete delta is kept; ``deadline_s``:
    how long after its first part, at most (if honest big deltas on slow uplinks are discarded
    ``incomplete``, raise it). ``client_quota_bytes``: spool bytes one client may reserve (0: twice
    the most this model's delta can take)."""

    timeout_s: float = 900.0
    deadline_s: float = 600.0
    max_bytes: int = 4 * GiB
    max_pending_per_client: int = 4
    client_quota_bytes: int = 0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_bytes < 1 or self.max_pending_per_client < 1:
            raise ConfigError("part timeout must be > 0, spool bytes and pending deltas >= 1")
        if self.deadline_s <= 0 or self.client_quota_bytes < 0:
            raise ConfigError("--part-deadline must be > 0 and the client spool quota >= 0")


@dataclass
class SpoolEntry:
    """One delta in the spool: what its first part announced and which parts are on disk."""

    key: str
    client_id: str
    seq: int
    count: int
    total_bytes: int
    sha256: bytes
    last_at: float  # unix time of its newest part
    first_at: float = 0.0  # unix time of its first part: the absolute deadline counts from here
    parts: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (offset, length)
    assembled: bool = False  # handed to the intake; removed after the commit that settles it
    expired: str = ""  # why it was discarded incomplete, once it was

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.count

    def meta(self) -> dict[str, object]:
        return {"client_id": self.client_id, "seq": self.seq, "count": self.count,
                "total_bytes": self.total_bytes, "sha256": self.sha256.hex(), "first_at": self.first_at}


@dataclass(frozen=True)
class PartResult:
    """``spooled`` (ack it), ``complete`` (ack it; the delta is ready), ``duplicate`` or ``rejected``."""

    kind: OutcomeKind  # SPOOLED, COMPLETE, DUPLICATE or REJECTED
    key: str = ""
    reason: str = ""
    detail: str = ""


class PartSpool:
    """The spool directory and an in-memory index of it; one thread uses it (the service's)."""

    def __init__(self, directory: Path, config: SpoolConfig) -> None:
        self.directory = directory
        self.config = config
        self.entries: dict[str, SpoolEntry] = {}
        self.counts: Counter[str] = Counter()  # parts_spooled, parts_duplicate, assembled, incomplete

    @property
    def reserved_bytes(self) -> int:
        return sum(e.total_bytes for e in self.entries.values())

    def recover(self, now: float) -> list[str]:
        """Index what a previous process left in the spool; return the keys of complete deltas.

        An entry the spool cannot read (a crash while its first part was written) is removed: its
        parts were never acked, so the broker delivers them again.
        """
        make_directory(self.directory)
        # Also when it was there: a process that crashed may have made it without this fsync.
        fsync_directory(self.directory.parent)
        for path in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            try:
                meta = json.loads((path / META).read_text())
                entry = SpoolEntry(
                    key=path.name, client_id=str(meta["client_id"]), seq=int(meta["seq"]),
                    count=int(meta["count"]), total_bytes=int(meta["total_bytes"]),
                    sha256=bytes.fromhex(meta["sha256"]), last_at=now,
                    first_at=min(now, float(meta.get("first_at", now))),  # a restart gives no extra time
                )
                for part in path.glob("*.part"):
                    offset, _, index = part.stem.partition("@")
                    entry.parts[int(index)] = (int(offset), part.stat().st_size)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                log.warning("removing unreadable spool entry %s (%s)", path.name, exc)
                shutil.rmtree(path, ignore_errors=True)
                continue
            self.entries[entry.key] = entry
        if self.entries:
            log.info("spool holds %d deltas in parts (%d complete)", len(self.entries),
                     sum(e.complete for e in self.entries.values()))
        return [e.key for e in self.entries.values() if e.complete]

    def refuse_new(self, part: DeltaPart, *, delta_bytes_bound: int | None = None) -> PartResult | None:
        """Why the delta that ``part`` would start may not enter the spool, or None if it may.

        ``delta_bytes_bound``: the most bytes a delta of this model encodes to (None: no bound
        but the protocol's); the client quota defaults to twice it.
        """
        key = spool_key(part.client_id, part.seq)
        if delta_bytes_bound is not None and part.total_bytes > delta_bytes_bound:
            return PartResult(OutcomeKind.REJECTED, key, "too_large",
                              f"delta declares {part.total_bytes} bytes; this model's deltas take at "
                              f"most {delta_bytes_bound}")
        own = [e for e in self.entries.values() if e.client_id == part.client_id]
        if len(own) >= self.config.max_pending_per_client:
            return PartResult(OutcomeKind.REJECTED, key, "too_many_pending",
                              f"client has {len(own)} deltas in parts already")
        quota = self.config.client_quota_bytes or (2 * delta_bytes_bound if delta_bytes_bound else 0)
        held = sum(e.total_bytes for e in own)
        if quota and held + part.total_bytes > quota:
            return PartResult(OutcomeKind.REJECTED, key, "spool_quota",
                              f"client holds {held} spool bytes; {part.total_bytes} more would pass its "
                              f"quota of {quota}")
        if self.reserved_bytes + part.total_bytes > self.config.max_bytes:
            return PartResult(OutcomeKind.REJECTED, key, "spool_full",
                              f"{part.total_bytes} more bytes would pass the spool's {self.config.max_bytes}")
        return None

    def add(self, part: DeltaPart, now: float, *, delta_bytes_bound: int | None = None) -> PartResult:
        """Store one part (durably) unless it is refused or already here (bounds: :meth:`refuse_new`)."""
        key = spool_key(part.client_id, part.seq)
        entry = self.entries.get(key)
        if entry is None:
            refused = self.refuse_new(part, delta_bytes_bound=delta_bytes_bound)
            if refused is not None:
                return refused
            entry = SpoolEntry(key=key, client_id=part.client_id, seq=part.seq, count=part.count,
                               total_bytes=part.total_bytes, sha256=part.sha256, last_at=now,
                               first_at=now)
            make_directory(self.directory / key)  # the spool fsynced: the entry outlives a power loss
            write_atomically(self.directory / key / META, json.dumps(entry.meta()).encode())
            self.entries[key] = entry
        elif (part.count, part.total_bytes, part.sha256) != (entry.count, entry.total_bytes, entry.sha256):
            return PartResult(OutcomeKind.REJECTED, key, "part_mismatch",
                              f"part {part.index} disagrees with the first part on count, size or hash")
        if entry.assembled or part.index in entry.parts:
            self.counts["parts_duplicate"] += 1
            return PartResult(OutcomeKind.DUPLICATE, key, "duplicate", f"part {part.index} is already here")
        write_atomically(self.directory / key / f"{part.offset}@{part.index}.part", part.data)
        entry.parts[part.index] = (part.offset, len(part.data))
        entry.last_at = now
        self.counts["parts_spooled"] += 1
        return PartResult(OutcomeKind.COMPLETE if entry.complete else OutcomeKind.SPOOLED, key)

    def assemble(self, key: str) -> bytes:
        """The delta's bytes, checked: parts contiguous from 0, ``total_bytes`` long, hash right.

        Marks the entry assembled (its later parts are duplicates). Raises :class:`ProtocolError`
        (``parts_corrupt``) if the parts do not make up the announced delta.
        """
        entry = self.entries[key]
        entry.assembled = True
        self.counts["assembled"] += 1
        chunks, expected = [], 0
        for index in range(entry.count):
            offset, length = entry.parts[index]
            if offset != expected:
                raise ProtocolError("parts_corrupt", f"part {index} starts at {offset}, expected {expected}")
            chunks.append((self.directory / key / f"{offset}@{index}.part").read_bytes())
            expected += length
        body = b"".join(chunks)
        if len(body) != entry.total_bytes:
            raise ProtocolError("parts_corrupt",
                                f"parts hold {len(body)} bytes, announced {entry.total_bytes}")
        if hashlib.sha256(body).digest() != entry.sha256:
            raise ProtocolError("parts_corrupt", "the parts' SHA-256 differs from the announced one")
        return body

    def discard(self, key: str) -> None:
        """Forget a delta and remove its directory (idempotent)."""
        self.entries.pop(key, None)
        shutil.rmtree(self.directory / key, ignore_errors=True)

    def expire(self, now: float) -> list[SpoolEntry]:
        """Remove and return the incomplete deltas whose newest part is older than the timeout, or
        whose first part is older than the deadline; each says why in ``expired``."""
        old = []
        for entry in list(self.entries.values()):
            if entry.assembled or entry.complete:
                continue
            got = f"{len(entry.parts)} of {entry.count} parts"
            if now - entry.last_at > self.config.timeout_s:
                entry.expired = f"{got}, none new for {self.config.timeout_s:.0f} s"
            elif now - entry.first_at > self.config.deadline_s:
                entry.expired = f"{got} {self.config.deadline_s:.0f} s after the first (the deadline)"
            else:
                continue
            log.warning("discarding delta %s:%d: %s", entry.client_id, entry.seq, entry.expired)
            self.discard(entry.key)
            self.counts["incomplete"] += 1
            old.append(entry)
        return old


def spool_key(client_id: str, seq: int) -> str:
    """The spool directory name of delta (client id, seq)."""
    return f"{client_id}~{seq}"


def take_part(spool: PartSpool, intake: DeltaIntake, body: bytes, now: float, *,
              sender: str = "") -> tuple[Outcome, str]:
    """Decode, screen and spool one part message.

    Returns the outcome that settles the part's delivery (``spooled`` and ``duplicate`` are acked,
    ``rejected`` is dead-lettered and counted) and, when it was the last missing part, the spool key
    of the now complete delta ("" otherwise). A refused part dooms its delta: its entry is dropped
    and the delta counted as rejected once, so its other parts become duplicates.
    """
    try:
        part = DeltaPart.decode(body, intake.config.limits)
    except ProtocolError as exc:
        outcome = Outcome.rejected(exc.reason, exc.detail)
        intake.count(outcome)
        return outcome, ""
    screened = intake.screen(part.run_id, part.client_id, part.seq, sender=sender, now=now)
    if screened is not None:
        if screened.kind is OutcomeKind.REJECTED:
            intake.count(screened)
        else:
            spool.counts["parts_duplicate"] += 1
        return screened, ""
    if spool_key(part.client_id, part.seq) not in spool.entries:  # the first part of its delta here
        for rule in intake.rules:
            refused = rule.refuse_first_part(part.client_id, now) if isinstance(rule, FirstPartRule) else None
            if refused is not None:
                outcome = Outcome.rejected(*refused, part.client_id, part.seq)
                intake.count(outcome)
                return outcome, ""
    result = spool.add(part, now, delta_bytes_bound=intake.max_delta_bytes)
    outcome = Outcome(result.kind, result.reason, result.detail, part.client_id, part.seq)
    if result.kind is OutcomeKind.REJECTED:
        spool.discard(result.key)
        intake.count(outcome)
    return outcome, result.key if result.kind is OutcomeKind.COMPLETE else ""
