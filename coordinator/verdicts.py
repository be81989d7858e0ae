"""The verdicts waiting to be told to their clients: each client's newest applied or rejected delta.

The intake records one per judged delta (:meth:`VerdictBoard.record`); the publisher appends them
to each client's verdict stream in Redis (:mod:`shared.verdict`), where the client's blocking read
waits for it. An applied delta's verdict is written only with a snapshot (:meth:`VerdictBoard.publish`
with its version): θ already holds every delta the intake applied, and the commit before the
publish made them durable, so that snapshot is the first to include it. A rejection's is written
at the next housekeeping pass too (:meth:`VerdictBoard.publish` without a version), up to a second
before the commit that records it: if the coordinator dies in between, the delta is delivered again
and judged again.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import redis

from coordinator.identity import IDENTITY_REASONS
from coordinator.outcome import Outcome, OutcomeKind
from shared.keys import RunKeys
from shared.verdict import VERDICT_STREAM_LEN, Verdict, append

log = logging.getLogger(__name__)

# Clients waiting for a write between two publishes; past it the newest verdicts of further
# clients are dropped (their round lines then say "?"), so a flood of client ids grows nothing.
MAX_PENDING = 10_000
# The client id of such a rejection is not known to be the sender's: no verdict under its name.
_UNVERIFIED = frozenset({"wrong_run", "bad_client_id", *IDENTITY_REASONS})


class VerdictBoard:
    """The verdicts of run ``run_id`` not yet written to Redis, the last few per client."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.pending: dict[str, list[Verdict]] = {}  # by client id, oldest first

    def record(self, outcome: Outcome, now: float) -> None:
        """Keep the verdict on an applied or rejected delta whose sender was checked (a client's
        last :data:`~shared.verdict.VERDICT_STREAM_LEN`: one that overlaps its rounds may have
        several judged between two snapshots)."""
        if outcome.kind not in (OutcomeKind.APPLIED, OutcomeKind.REJECTED) or not outcome.client_id:
            return
        if outcome.reason in _UNVERIFIED or outcome.seq < 0:
            return
        if outcome.client_id not in self.pending and len(self.pending) >= MAX_PENDING:
            log.debug("verdict on %s dropped: %d clients already wait for theirs", outcome.delta_id,
                      MAX_PENDING)
            return
        applied = outcome.kind is OutcomeKind.APPLIED
        waiting = self.pending.setdefault(outcome.client_id, [])
        waiting.append(Verdict(
            run_id=self.run_id, seq=outcome.seq, applied=applied, reason="" if applied else outcome.reason,
            detail="" if applied else outcome.detail, at=now))
        del waiting[:-VERDICT_STREAM_LEN]

    def publish(self, client: redis.Redis, keys: RunKeys, *, version: int | None = None,
                cycle_open: bool = False) -> None:
        """Write the pending verdicts in one round trip: with snapshot ``version`` just published
        (whose outer buffer cycle is open or not) all of them, applied ones naming it; without,
        the rejections only. Redis errors propagate (the publisher's outage handling); the
        verdicts then stay pending for the next try."""
        ready = {c: [v for v in waiting if version is not None or not v.applied]
                 for c, waiting in self.pending.items()}
        if not any(ready.values()):
            return
        pipe = client.pipeline(transaction=False)
        for client_id, verdicts in ready.items():
            for verdict in verdicts:
                if verdict.applied and version is not None:
                    verdict = replace(verdict, version=version, cycle_open=cycle_open)
                append(pipe, keys.verdicts(client_id), verdict)
        pipe.execute()
        for client_id, verdicts in ready.items():
            left = [v for v in self.pending[client_id] if v not in verdicts]
            if left:
                self.pending[client_id] = left
            else:
                del self.pending[client_id]
