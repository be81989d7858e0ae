"""What became of one delivery: the intake's answer, which the consumer turns into ack or dead letter.

Every kind a delivery can end in is one :class:`OutcomeKind`. ``applied``, ``duplicate``,
``spooled`` and ``complete`` are acked; ``rejected`` is dead-lettered with its reason. A rejection's
``reason`` is a short slug that ``status`` counts (``stale``, ``non_finite``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class OutcomeKind(str, Enum):
    APPLIED = "applied"  # the delta moved θ (or joined the sync round's buffer)
    DUPLICATE = "duplicate"  # already applied or rejected: acked, nothing done
    REJECTED = "rejected"  # refused with a reason: dead-lettered and counted
    SPOOLED = "spooled"  # one part of a big delta written to the spool: acked
    COMPLETE = "complete"  # the last missing part: acked; the delta is ready to be put together


@dataclass(frozen=True)
class Outcome:
    """The fate of one delivery, with the delta's identity when it could be read."""

    kind: OutcomeKind
    reason: str = ""
    detail: str = ""
    client_id: str = ""
    seq: int = -1
    staleness: int = 0

    @classmethod
    def rejected(cls, reason: str, detail: str, client_id: str = "", seq: int = -1,
                 staleness: int = 0) -> Outcome:
        return cls(OutcomeKind.REJECTED, reason, detail, client_id, seq, staleness)

    @property
    def delta_id(self) -> str:
        return f"{self.client_id}:{self.seq}" if self.client_id else ""

    @property
    def acked(self) -> bool:
        """True when the delivery is acknowledged; a rejected one is dead-lettered instead."""
        return self.kind is not OutcomeKind.REJECTED
