"""The verdicts waiting to be told to their clients: each client's newest applied or rejected delta.

The intake records one per judged delta (:meth:`VerdictBoard.record`); the publisher writes them
to Redis (:meth:`VerdictBoard.publish`) with each snapshot and at every housekeeping pass, one
small key per client (:mod:`shared.verdict`), so a client learns the fate of its delta by one GET.
A verdict may be written up to a second before the commit that records it: if the coordinator
dies in between, the delta is delivered again and judged again.
"""

from __future__ import annotations

import logging

import redis

from coordinator.identity import IDENTITY_REASONS
from coordinator.outcome import Outcome, OutcomeKind
from shared.keys import RunKeys
from shared.verdict import Verdict

log = logging.getLogger(__name__)

VERDICT_TTL_S = 24 * 3600
# Clients waiting for a write between two publishes; past it the newest verdicts of further
# clients are dropped (their round lines then say "?"), so a flood of client ids grows nothing.
MAX_PENDING = 10_000
# The client id of such a rejection is not known to be the sender's: no verdict under its name.
_UNVERIFIED = frozenset({"wrong_run", "bad_client_id", *IDENTITY_REASONS})


class VerdictBoard:
    """The verdicts of run ``run_id`` not yet written to Redis, newest per client."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.pending: dict[str, Verdict] = {}

    def record(self, outcome: Outcome, now: float) -> None:
        """Keep the verdict on an applied or rejected delta whose sender was checked."""
        if outcome.kind not in (OutcomeKind.APPLIED, OutcomeKind.REJECTED) or not outcome.client_id:
            return
        if outcome.reason in _UNVERIFIED or outcome.seq < 0:
            return
        if outcome.client_id not in self.pending and len(self.pending) >= MAX_PENDING:
            log.debug("verdict on %s dropped: %d clients already wait for theirs", outcome.delta_id,
                      MAX_PENDING)
            return
        applied = outcome.kind is OutcomeKind.APPLIED
        self.pending[outcome.client_id] = Verdict(
            run_id=self.run_id, seq=outcome.seq, applied=applied, reason="" if applied else outcome.reason,
            detail="" if applied else outcome.detail, at=now)

    def publish(self, client: redis.Redis, keys: RunKeys) -> None:
        """Write the pending verdicts in one round trip. Redis errors propagate (the publisher's
        outage handling); the verdicts then stay pending for the next try."""
        if not self.pending:
            return
        pipe = client.pipeline(transaction=False)
        for client_id, verdict in self.pending.items():
            pipe.set(keys.verdict(client_id), verdict.encode(), ex=VERDICT_TTL_S)
        pipe.execute()
        self.pending.clear()
