"""Who sent a delta: the broker-validated sender, checked against the client id the delta claims.

RabbitMQ stamps nothing by itself, but it refuses a publish whose ``user_id`` property is not the
publishing connection's own user, and the client always sets it (``client/uploader.py``). So the
``user_id`` a delivery carries (``Delivery.sender``) is the broker user whose credentials sent it.

``--auth invite`` (:class:`InvitedSenders`): every sender must be a volunteer of the run's book
(:mod:`coordinator.volunteers`), not revoked or expired, and may only send under its own name.
``--auth open`` (:class:`OpenSenders`): anyone with the broker's credentials may send under any
client id, as on a developer's machine or in the local demo; never for a run open to strangers.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from coordinator.admission import Refusal
from coordinator.volunteers import VolunteerBook


class AuthMode(str, Enum):
    OPEN = "open"
    INVITE = "invite"


class SenderCheck(Protocol):
    def refuse(self, sender: str, client_id: str, now: float) -> Refusal | None:
        """A (reason, detail) if ``sender`` may not send as ``client_id``, else None."""


class OpenSenders:
    """Every sender may use every client id (``--auth open``)."""

    def refuse(self, sender: str, client_id: str, now: float) -> Refusal | None:
        return None


class InvitedSenders:
    """Only invited volunteers, each under its own name (``--auth invite``)."""

    def __init__(self, book: VolunteerBook) -> None:
        self.book = book

    def refuse(self, sender: str, client_id: str, now: float) -> Refusal | None:
        volunteer = self.book.by_user(sender)
        if volunteer is None and self.book.reload():  # invited a moment ago (one stat() when unknown)
            volunteer = self.book.by_user(sender)
        if volunteer is None:
            return "unknown_volunteer", f"sender {sender[:80]!r} is not a volunteer of this run"
        refused = volunteer.refusal(now)
        if refused is not None:
            return refused
        if client_id != volunteer.name:
            return "identity_mismatch", f"{volunteer.name} sent a delta claiming to be {client_id!r}"
        return None


# Rejections that say something about the sender, not about the claimed client's own sequence: a
# forged delta must not settle (and so block) the victim's sequence number.
IDENTITY_REASONS = frozenset({"unknown_volunteer", "revoked", "identity_mismatch"})
