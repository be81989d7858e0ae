"""What the coordinator made of a client's delta: applied, or rejected and why.

The coordinator writes the verdict on each client's newest judged delta to
``asyncloco:RUN:verdict:CLIENT_ID`` (JSON, at most :data:`MAX_VERDICT_BYTES`, expiring after a
day) with the snapshot that includes it, or within a second for a rejection; the client reads its
own after each round and says so in its round line. It is not signed: a forged one can only
mislead that line, never what the client trains or sends.

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


@dataclass(frozen=True)
class Verdict:
    """The fate of delta ``seq`` of a client in run ``run_id``; ``reason`` is "" when applied, else
    the rejection's slug (``stale``, ``already_sent``: docs/STATUS.md lists them), and ``detail``
    its explanation. ``at``: Unix time of the judgment."""

    run_id: str
    seq: int
    applied: bool
    reason: str = ""
    detail: str = ""
    at: float = 0.0

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
        if not (0 < len(doc["run_id"]) <= MAX_ID_CHARS and len(doc["reason"]) <= MAX_ID_CHARS
                and doc["seq"] >= 0 and math.isfinite(doc["at"])):
            raise ProtocolError("wrong_schema", "verdict field out of range")
        return cls(run_id=doc["run_id"], seq=doc["seq"], applied=doc["applied"], reason=doc["reason"],
                   detail=doc["detail"][:MAX_DETAIL_CHARS], at=float(doc["at"]))

    def describe(self) -> str:
        """``applied`` or ``rejected: stale (base 3 is 40 deltas old)``, for the round line."""
        if self.applied:
            return "applied"
        return f"rejected: {self.reason}" + (f" ({self.detail})" if self.detail else "")
