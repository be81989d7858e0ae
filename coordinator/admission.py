"""Admission rules: whether a decoded, screened delta may touch the model now.

The intake asks each rule of its list in order; the first that refuses decides the delta's reason.
A new rule (a ban list, a rate limit, a quota) is one more object with these two methods, added
where the list is built (:func:`coordinator.run_state.admission_rules`); the intake does not change.
The mode-specific rules live beside their state: the sync round's barrier
(:mod:`coordinator.sync_round`) and the warm start (:mod:`coordinator.warm_start`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Arrival:
    """What the rules may judge: the delta's identity, its base and the steps it claims."""

    client_id: str
    seq: int
    base_version: int
    staleness: int  # committed version minus base version
    local_steps: int
    now: float  # unix time


Refusal = tuple[str, str]  # (reason slug, detail)


class AdmissionRule(Protocol):
    def refuse(self, arrival: Arrival) -> Refusal | None:
        """A (reason, detail) if the delta may not be applied, else None. Must not change state."""

    def admitted(self, arrival: Arrival) -> None:
        """Called once the delta was applied: keep whatever the rule tracks."""


@dataclass(frozen=True)
class StalenessBound:
    """Refuse a delta whose base is more than ``max_staleness`` versions behind."""

    max_staleness: int

    def refuse(self, arrival: Arrival) -> Refusal | None:
        if arrival.staleness > self.max_staleness:
            return "stale", f"{arrival.staleness} versions behind (bound {self.max_staleness})"
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
