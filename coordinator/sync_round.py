"""The barrier of synchronous DiLoCo (``--strategy sync``), the baseline users would otherwise run.

Every round, each active client sends one delta computed on the round's base version; when all have
arrived, the outer optimizer takes one Nesterov step on their mean and a new version is published.
A client that vanished holds the round up for at most ``timeout_s`` after the first delta of the
round arrived; then the round completes with the deltas it has, and the missing client drops out of
the active set once its registry entry goes stale.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator.admission import Arrival, Refusal
from coordinator.registry import ClientRegistry
from shared.errors import ConfigError


class SyncBarrier:
    """The round's state, and the admission rule that only lets the round's own deltas in."""

    def __init__(self, registry: ClientRegistry, *, timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ConfigError("the sync round timeout must be > 0")
        self.registry = registry  # whom a round waits for: clients in contact
        self.timeout_s = timeout_s
        self.base_version = 0
        self.arrived: set[str] = set()
        self.first_arrival_at: float | None = None  # unix time of the round's first delta

    def refuse(self, arrival: Arrival) -> Refusal | None:
        """A (reason, detail) if this delta cannot join the round, else None.

        Either way the sender was heard from: a client whose delta came too late still belongs to
        the next rounds, which wait for it.
        """
        self.registry.get(arrival.client_id).last_contact = arrival.now
        if arrival.base_version != self.base_version:
            return "stale", f"sync round is on version {self.base_version}, delta on {arrival.base_version}"
        if arrival.client_id in self.arrived:
            return ("already_in_round",
                    f"{arrival.client_id} already sent its delta for version {arrival.base_version}")
        return None

    def admitted(self, arrival: Arrival) -> None:
        if not self.arrived:
            self.first_arrival_at = arrival.now
        self.arrived.add(arrival.client_id)

    def ready(self, now: float) -> bool:
        """True when every client in contact has sent, or the timeout ran out with at least one delta."""
        if not self.arrived:
            return False
        if self.registry.in_contact(now) <= self.arrived:
            return True
        assert self.first_arrival_at is not None
        return now - self.first_arrival_at >= self.timeout_s

    def next_round(self, base_version: int) -> None:
        self.base_version = base_version
        self.arrived.clear()
        self.first_arrival_at = None

    def save_state(self) -> dict[str, Any]:
        return {"sync_barrier": {"base_version": self.base_version, "arrived": sorted(self.arrived)}}

    def load_state(self, state: dict[str, Any]) -> None:
        data = state.get("sync_barrier")
        if not data:
            return
        self.base_version = int(data["base_version"])
        self.arrived = set(data["arrived"])
        self.first_arrival_at = time.time() if self.arrived else None  # the timeout restarts on resume
