"""What the coordinator made of a client's delta: applied (in which snapshot), or rejected and why.

The coordinator appends the verdict on each of a client's judged deltas to the Redis stream
``asyncloco:RUN:verdicts:CLIENT_ID`` (field ``v``: JSON of at most :data:`MAX_VERDICT_BYTES`; the
newest :data:`VERDICT_STREAM_LEN` entries kept, the key expiring after a day): an applied delta's
with the snapshot that includes it, naming that snapshot's version and whether its outer buffer
cycle is still open; a rejection's within a second. A client that has sent a delta waits for its
verdict with one blocking ``XREAD`` (:func:`parse_entries`) instead of polling the version and
manifests, so it learns within milliseconds of the publish, at one Redis command a wait. It is
not signed: a forged one can only mislead the round line or when the next round starts (whose
snapshot is signed and read afresh), never what the client trains or sends.

A verdict is written only once the sender's identity was checked (never for a delta of another
run or a client id the sender may not use), so nobody can write one under another's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import ProtocolError

MAX_VERDICT_BYTES = 2048
MAX_DETAIL_CHARS = 200  # the rejection's detail is cut to this
MAX_ID_CHARS = 128
VERDICT_FIELD = b"v"  # the stream entry's one field
VERDICT_STREAM_LEN = 8  # entries kept per client: its last few deltas' verdicts
VERDICT_TTL_S = 24 * 3600  # a client's stream goes a day after its last verdict
MAX_ENTRIES_READ = 16  # a read takes at most this many entries (the stream holds fewer)


@dataclass(frozen=True)
class Verdict:
    """The fate of delta ``seq`` of a client in run ``run_id``; ``reason`` is "" when applied, else
    the rejection's slug (``stale``, ``already_sent``: docs/STATUS.md lists them), and ``detail``
    its explanation. ``at``: Unix time of the judgment. An applied delta's ``version`` is the
    snapshot that first includes it (-1 on a rejection), and ``cycle_open`` whether that
    snapshot's outer buffer cycle is still open (the manifest's ``progress.cycle_open``)."""

    run_id: str
    seq: int
    applied: bool
    reason: str = ""
    detail: str = ""
    at: float = 0.0
    version: int = -1
    cycle_open: bool = False

    def encode(self) -> bytes:
        doc = asdict(self)
        doc["detail"] = self.detail[:MAX_DETAIL_CHARS]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Verdict:
        """Parse one verdict; :class:`ProtocolError` for anything else (too big, not JSON, a field
        missing or of the wrong type). Unknown fields are ignored (a newer coordinator's)."""
        if len(data) > MAX_VERDICT_BYTES:
            raise ProtocolError("too_large", f"verdict is {len(data)} bytes, limit {MAX_VERDICT_BYTES}")
        try:
            doc: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("undecodable", f"verdict is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ProtocolError("wrong_schema", "verdict is not an object")
        kinds: dict[str, type | tuple[type, ...]] = {
            "run_id": str, "seq": int, "applied": bool, "reason": str, "detail": str, "at": (int, float)}
        for name, kind in kinds.items():
            value = doc.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ProtocolError("wrong_schema", f"verdict field {name!r} missing or not {kind}")
        version, cycle_open = doc.get("version", -1), doc.get("cycle_open", False)
        if not isinstance(version, int) or isinstance(version, bool) or not isinstance(cycle_open, bool):
            raise ProtocolError("wrong_schema", "verdict field 'version' or 'cycle_open' of the wrong type")
        if not (0 < len(doc["run_id"]) <= MAX_ID_CHARS and len(doc["reason"]) <= MAX_ID_CHARS
                and doc["seq"] >= 0 and math.isfinite(doc["at"]) and version >= -1):
            raise ProtocolError("wrong_schema", "verdict field out of range")
        return cls(run_id=doc["run_id"], seq=doc["seq"], applied=doc["applied"], reason=doc["reason"],
                   detail=doc["detail"][:MAX_DETAIL_CHARS], at=float(doc["at"]), version=version,
                   cycle_open=cycle_open)

    def describe(self) -> str:
        """``applied`` or ``rejected: stale (base 3 is 40 deltas old)``, for the round line."""
        if self.applied:
            return "applied"
        return f"rejected: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def append(client: Any, key: str, verdict: Verdict) -> None:
    """Queue ``verdict``'s append to the client's stream ``key`` on ``client`` (a Redis client or a
    pipeline): the newest :data:`VERDICT_STREAM_LEN` kept, the key living a day past the last."""
    client.xadd(key, {VERDICT_FIELD: verdict.encode()}, maxlen=VERDICT_STREAM_LEN, approximate=False)
    client.expire(key, VERDICT_TTL_S)


def parse_entries(entries: Any) -> tuple[list[Verdict], bytes | None]:
    """The verdicts in the entries of one stream (``XREAD``'s ``[(id, {field: value})]``, read
    from a server a client must not trust) and the newest entry id, to read on from. Entries that
    are not verdicts are skipped; at most :data:`MAX_ENTRIES_READ` are looked at."""
    found: list[Verdict] = []
    last: bytes | None = None
    if not isinstance(entries, (list, tuple)):
        return found, last
    for entry in entries[:MAX_ENTRIES_READ]:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            continue
        entry_id, fields = entry
        if isinstance(entry_id, str):
            entry_id = entry_id.encode()
        if not isinstance(entry_id, bytes) or len(entry_id) > 64:
            continue
        last = entry_id
        raw = fields.get(VERDICT_FIELD) if isinstance(fields, dict) else None
        if not isinstance(raw, bytes):
            continue
        try:
            found.append(Verdict.decode(raw))
        except ProtocolError:
            continue
    return found, last
