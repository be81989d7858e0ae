"""The barrier of synchronous DiLoCo (``--strategy sync``), the baseline users would otherwise run.

Every round, each active client sends one delta computed on the round's base version; when all have
arrived, the outer optimizer takes one Nesterov step on their mean and a new version is published.
A client that vanished holds the round up for at most ``timeout_s`` after the first delta of the
round arrived; then the round completes with the deltas it has, and the missing client drops out of
the active set once its registry entry goes stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError


@dataclass
class SyncBarrier:
    timeout_s: float = 60.0
    base_version: int = 0
    arrived: set[str] = field(default_factory=set)
    first_arrival_at: float | None = None  # time.monotonic() of the round's first delta

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError("the sync round timeout must be > 0")

    def refuse(self, client_id: str, base_version: int) -> tuple[str, str] | None:
        """A (reason, detail) if this delta cannot join the round, else None."""
        if base_version != self.base_version:
            return ("stale", f"sync round is on version {self.base_version}, delta on {base_version}")
        if client_id in self.arrived:
            return ("already_in_round", f"{client_id} already sent its delta for version {base_version}")
        return None

    def add(self, client_id: str, now: float) -> None:
        if not self.arrived:
            self.first_arrival_at = now
        self.arrived.add(client_id)

    def ready(self, active_ids: set[str], now: float) -> bool:
        """True when every active client has sent, or the timeout ran out with at least one delta."""
        if not self.arrived:
            return False
        if active_ids <= self.arrived:
            return True
        assert self.first_arrival_at is not None
        return now - self.first_arrival_at >= self.timeout_s

    def next_round(self, base_version: int) -> None:
        self.base_version = base_version
        self.arrived.clear()
        self.first_arrival_at = None

    def to_json(self) -> dict[str, Any]:
        return {"base_version": self.base_version, "arrived": sorted(self.arrived)}

    def load_json(self, data: dict[str, Any], now: float) -> None:
        self.base_version = int(data["base_version"])
        self.arrived = set(data["arrived"])
        self.first_arrival_at = now if self.arrived else None  # the timeout restarts after a resume
