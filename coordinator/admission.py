"""Admission rules: whether a decoded, screened delta may touch the model now.

The intake asks each rule of its list in order; the first that refuses decides the delta's reason.
A new rule (a ban list, a rate limit, a quota) is one more object with these two methods, added
where the list is built (:func:`coordinator.run_state.admission_rules`); the intake does not change.
The mode-specific rules live beside their state: the sync round's barrier
(:mod:`coordinator.sync_round`) and the warm start (:mod:`coordinator.warm_start`).

Volunteers are strangers, so what a delta claims is bounded here by what the coordinator knows
itself: its local steps by the round length the plan assigned its sender (:class:`AssignmentBound`),
its base by the sender's previous delta (:class:`OnePerBase`), its sender's pace by a token bucket
(:class:`RateLimit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from coordinator.registry import ClientRegistry
from shared.errors import ConfigError


@dataclass(frozen=True)
class Arrival:
    """What the rules may judge: the delta's identity, its base and the steps it claims."""

    client_id: str
    seq: int
    base_version: int
    staleness: int  # deltas applied since its base version was taken (arrivals, not versions)
    local_steps: int
    now: float  # unix time
    from_parts: bool = False  # put together from parts: its first part already passed the rate limit
    active_clients: int = 1  # clients heard from lately, the sender included
    stacked_on: int = -1  # the sender's delta its round started on top of (DeltaMessage.stacked_on)
    origin_version: int = -1  # the version a round that moved began on (DeltaMessage.origin_version)

    @property
    def began_on(self) -> int:
        """The version the round began on: its base, or an earlier one it claims to have moved from
        (``--follow``, ``--overlap``). A claim that can only widen the window of plans counted, all
        of them at most H: see :class:`AssignmentBound`."""
        return self.base_version if self.origin_version < 0 else min(self.origin_version, self.base_version)


Refusal = tuple[str, str]  # (reason slug, detail)


class AdmissionRule(Protocol):
    def refuse(self, arrival: Arrival) -> Refusal | None:
        """A (reason, detail) if the delta may not be applied, else None. Must not change state
        (a meter excepted: :class:`RateLimit` counts every delta it is asked about)."""

    def admitted(self, arrival: Arrival) -> None:
        """Called once the delta was applied: keep whatever the rule tracks."""


@runtime_checkable
class FirstPartRule(Protocol):
    """A rule that also judges a delta sent in parts, once, when its first part arrives."""

    def refuse_first_part(self, client_id: str, now: float) -> Refusal | None:
        """A (reason, detail) if the sender may not start another delta in parts now, else None."""


# The automatic staleness bound: this many arrivals per active client, and never below the floor.
# An asynchronous delta is typically N − 1 arrivals stale (N clients of equal speed); a client 8×
# slower than the rest without DyLU about 8·N.
STALENESS_PER_CLIENT = 8
STALENESS_FLOOR = 32


@dataclass(frozen=True)
class StalenessBound:
    """Refuse a delta whose base is more than ``max_staleness`` applied deltas behind; 0 means
    automatic: :data:`STALENESS_PER_CLIENT` per active client, at least :data:`STALENESS_FLOOR`."""

    max_staleness: int

    def bound(self, active_clients: int) -> int:
        if self.max_staleness:
            return self.max_staleness
        return max(STALENESS_FLOOR, STALENESS_PER_CLIENT * active_clients)

    def refuse(self, arrival: Arrival) -> Refusal | None:
        bound = self.bound(arrival.active_clients)
        if arrival.staleness > bound:
            return "stale", f"{arrival.staleness} updates behind (bound {bound})"
        return None

    def admitted(self, arrival: Arrival) -> None:
        pass


@dataclass(frozen=True)
class LocalStepsBound:
    """Refuse a delta that claims fewer than 1 or more than ``max_local_steps`` local steps."""

    max_local_steps: int

    def refuse(self, arrival: Arrival) -> Refusal | None:
        if not 1 <= arrival.local_steps <= self.max_local_steps:
            return "bad_steps", f"local_steps {arrival.local_steps} out of range"
        return None

    def admitted(self, arrival: Arrival) -> None:
        pass


# A delta may claim this much more than its assignment and still be taken: a client's round can run
# a step or so long (it checks the clock between steps), and its plan may be a refresh old. Beyond,
# the claim is not a measurement error but a lie: refused, and nobody's progress counts it.
ASSIGNMENT_SLACK = 1.25
ASSIGNMENT_SLACK_STEPS = 1


def steps_allowed(assigned: int) -> int:
    """The most local steps a delta assigned ``assigned`` steps may claim: ×1.25 + 1."""
    return int(assigned * ASSIGNMENT_SLACK) + ASSIGNMENT_SLACK_STEPS


@dataclass(frozen=True)
class AssignmentBound:
    """Refuse a delta claiming more local steps than any plan assigned its sender from the version
    its round began on (H for a client the plans did not name), beyond the slack:
    ``over_assignment``. A round that moved onto newer snapshots while it trained counts from the
    version it began on (its claim, :attr:`Arrival.began_on`): it ran the length offered then, which
    a plan published since may have shortened. No plan offers more than H, so the claim can raise
    the bound to H's at most, as for any client the plans do not name."""

    registry: ClientRegistry

    def refuse(self, arrival: Arrival) -> Refusal | None:
        assigned = self.registry.assignment_limit(arrival.client_id, arrival.began_on)
        if arrival.local_steps > steps_allowed(assigned):
            return ("over_assignment", f"local_steps {arrival.local_steps} > {steps_allowed(assigned)} "
                    f"(assigned {assigned} from version {arrival.began_on}, with slack)")
        return None

    def admitted(self, arrival: Arrival) -> None:
        pass


@dataclass(frozen=True)
class OnePerBase:
    """At most one applied delta per client per base version (asynchronous runs; a sync round has
    its own ``already_in_round``): a second round on the same base repeats most of the first, and
    would be counted twice. Refused ``already_sent``. Unless it is stacked on that first one: its
    round started from the base moved by the first delta as θ moves at its arrival (``--overlap``),
    so it holds new work only; it must name the client's newest applied delta on that very base."""

    registry: ClientRegistry

    def refuse(self, arrival: Arrival) -> Refusal | None:
        record = self.registry.clients.get(arrival.client_id)
        if record is None or arrival.base_version > record.last_base:
            return None
        if arrival.base_version == record.last_base and 0 <= arrival.stacked_on == record.last_applied_seq:
            return None
        return ("already_sent", f"{arrival.client_id} already has a delta applied on version "
                f"{record.last_base}; this one is on {arrival.base_version}"
                + (f" and stacked on {arrival.stacked_on}, not {record.last_applied_seq}"
                   if arrival.stacked_on >= 0 else ""))

    def admitted(self, arrival: Arrival) -> None:
        pass  # the registry records the base of every applied delta


RATE_BURST_DELTAS = 16  # deltas a client may send at once after a quiet spell
# Its sustained pace: one every 0.5 s, above an honest round even of the tiny demo model (~1 s), and
# a bound on what one identity can make the coordinator decode.
RATE_DELTAS_PER_MINUTE = 120.0
RATE_BUCKETS_KEPT = 1024  # beyond this many clients' buckets, full ones (fresh again) are forgotten


@dataclass
class RateLimit:
    """A token bucket per client: ``burst`` deltas, refilled at ``per_minute``; over it, a delta is
    refused ``rate_limited``. Every delta asked about costs a token, applied or not (what it cost
    to receive is paid either way); a delta in parts costs one, at its first part."""

    burst: int = RATE_BURST_DELTAS
    per_minute: float = RATE_DELTAS_PER_MINUTE
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (tokens, unix time)

    def __post_init__(self) -> None:
        if self.burst < 1 or self.per_minute <= 0:
            raise ConfigError("the rate limit needs a burst >= 1 and more than 0 deltas per minute")

    def take(self, client_id: str, now: float) -> Refusal | None:
        """Spend one of ``client_id``'s tokens, or refuse if it has none left."""
        tokens, then = self.buckets.get(client_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - then) * self.per_minute / 60.0)
        if tokens < 1.0:
            self.buckets[client_id] = (tokens, now)
            wait_s = (1.0 - tokens) * 60.0 / self.per_minute
            return ("rate_limited", f"{client_id} is over {self.per_minute:g} deltas per minute "
                    f"(burst {self.burst}); next one in {wait_s:.1f} s")
        self.buckets[client_id] = (tokens - 1.0, now)
        if len(self.buckets) > RATE_BUCKETS_KEPT:
            self._forget_full(now)
        return None

    def _forget_full(self, now: float) -> None:
        refill_s = self.burst * 60.0 / self.per_minute
        for cid, (_, then) in list(self.buckets.items()):
            if now - then >= refill_s:  # full again: the same as a bucket never seen
                del self.buckets[cid]

    def refuse(self, arrival: Arrival) -> Refusal | None:
        return None if arrival.from_parts else self.take(arrival.client_id, arrival.now)

    def refuse_first_part(self, client_id: str, now: float) -> Refusal | None:
        return self.take(client_id, now)

    def admitted(self, arrival: Arrival) -> None:
        pass
