"""Deltas too big for one broker message: their parts wait in a spool on disk until all are in.

Why on disk, and not unacked in the broker: while a big delta's parts arrive, other clients' parts
interleave with them. Held unacked, they would fill the prefetch window and the queue's byte bound,
and a delta could then never complete. So each part is written to ``DIR/<client>~<seq>/`` (fsynced,
renamed into place) and acked at once: from then on the spool holds it, across crashes.

When the last part is in, the delta is put together, its SHA-256 checked, and it is handled like any
other delta. Its directory is removed only after the commit that settles it. A crash in between
finds it whole on restart and handles it again; the (client id, seq) de-duplication drops it if
that commit had landed. A delta whose parts stop coming is discarded ``timeout_s`` after its
newest part (reason ``incomplete``); parts that turn up later are duplicates of a settled delta.

Bounds: a new delta reserves its whole ``total_bytes`` of the spool's ``max_bytes`` when its first
part arrives (so a delta that started can always finish), and one client has at most
``max_pending_per_client`` deltas in the spool. Over either, the part is refused (``spool_full``,
``too_many_pending``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.intake import DeltaIntake
from coordinator.outcome import Outcome, OutcomeKind
from shared.errors import ConfigError, ProtocolError
from shared.files import write_atomically
from shared.protocol import DeltaPart

log = logging.getLogger(__name__)

GiB = 1024**3
META = "meta.json"


@dataclass(frozen=True)
class SpoolConfig:
    """``timeout_s``: how long after its newest part an incomplete delta is kept."""

    timeout_s: float = 900.0
    max_bytes: int = 4 * GiB
    max_pending_per_client: int = 4

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_bytes < 1 or self.max_pending_per_client < 1:
            raise ConfigError("part timeout must be > 0, spool bytes and pending deltas >= 1")


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
    parts: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (offset, length)
    assembled: bool = False  # handed to the intake; removed after the commit that settles it

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.count

    def meta(self) -> dict[str, object]:
        return {"client_id": self.client_id, "seq": self.seq, "count": self.count,
                "total_bytes": self.total_bytes, "sha256": self.sha256.hex()}


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
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            try:
                meta = json.loads((path / META).read_text())
                entry = SpoolEntry(
                    key=path.name, client_id=str(meta["client_id"]), seq=int(meta["seq"]),
                    count=int(meta["count"]), total_bytes=int(meta["total_bytes"]),
                    sha256=bytes.fromhex(meta["sha256"]), last_at=now,
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

    def add(self, part: DeltaPart, now: float) -> PartResult:
        """Store one part (durably) unless it is refused or already here."""
        key = f"{part.client_id}~{part.seq}"
        entry = self.entries.get(key)
        if entry is None:
            pending = sum(1 for e in self.entries.values() if e.client_id == part.client_id)
            if pending >= self.config.max_pending_per_client:
                return PartResult(OutcomeKind.REJECTED, key, "too_many_pending",
                                  f"client has {pending} deltas in parts already")
            if self.reserved_bytes + part.total_bytes > self.config.max_bytes:
                return PartResult(OutcomeKind.REJECTED, key, "spool_full",
                                  f"{part.total_bytes} more bytes would pass the spool's "
                                  f"{self.config.max_bytes}")
            entry = SpoolEntry(key=key, client_id=part.client_id, seq=part.seq, count=part.count,
                               total_bytes=part.total_bytes, sha256=part.sha256, last_at=now)
            (self.directory / key).mkdir(parents=True, exist_ok=True)
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
        """Remove and return the incomplete deltas whose newest part is older than the timeout."""
        old = [e for e in self.entries.values()
               if not e.assembled and not e.complete and now - e.last_at > self.config.timeout_s]
        for entry in old:
            log.warning("discarding delta %s:%d: %d of %d parts after %.0f s without another",
                        entry.client_id, entry.seq, len(entry.parts), entry.count, self.config.timeout_s)
            self.discard(entry.key)
            self.counts["incomplete"] += 1
        return old


def take_part(spool: PartSpool, intake: DeltaIntake, body: bytes, now: float) -> tuple[Outcome, str]:
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
    screened = intake.screen(part.run_id, part.client_id, part.seq)
    if screened is not None:
        if screened.kind is OutcomeKind.REJECTED:
            intake.count(screened)
        else:
            spool.counts["parts_duplicate"] += 1
        return screened, ""
    result = spool.add(part, now)
    outcome = Outcome(result.kind, result.reason, result.detail, part.client_id, part.seq)
    if result.kind is OutcomeKind.REJECTED:
        spool.discard(result.key)
        intake.count(outcome)
    return outcome, result.key if result.kind is OutcomeKind.COMPLETE else ""
