"""Warm start: the run's first local steps are ordinary single-worker training, then Local-SGD.

Asynchronous Local-SGD is measured in the paper from a model pretrained by ordinary training, and
from scratch it gains less from extra workers: early on, consecutive deltas are large and differ,
so averaging stale ones costs more than the extra compute brings (docs/BENCHMARKS.md). With
``--warm-start-steps K`` the coordinator runs that first phase itself:

* one client, the *holder*, trains alone; each of its deltas replaces θ by the holder's local
  model (``θ -= g``: no outer momentum, no averaging), so the phase is plain training in rounds;
* the holder is the sender of the first delta based on the current version; the plan names it,
  and other clients wait instead of training rounds that would be refused (``warming_up``);
* if the holder sends nothing for ``handover_s``, the plan names nobody and the next client whose
  delta arrives on the current version takes over;
* once the run has K local steps in all, the plan names nobody and the configured outer strategy
  takes over from the warmed-up θ, with its momentum starting at zero.
"""

from __future__ import annotations

from typing import Any

from coordinator.admission import Arrival, Refusal
from coordinator.progress import RunProgress


class WarmStart:
    """The warm start's state, and the admission rule that lets only its holder in while it lasts."""

    def __init__(self, until_steps: int, *, progress: RunProgress, handover_s: float = 30.0) -> None:
        self.until_steps = until_steps
        self.progress = progress  # the run's local steps so far decide when the warm start ends
        self.handover_s = handover_s
        self.holder = ""
        self.holder_seen = 0.0  # unix time of the holder's last applied delta

    @property
    def active(self) -> bool:
        return self.progress.local_steps < self.until_steps

    def current_holder(self, now: float) -> str:
        """The holder the plan names: nobody once it went quiet for ``handover_s``."""
        return self.holder if self.holder and now - self.holder_seen <= self.handover_s else ""

    def refuse(self, arrival: Arrival) -> Refusal | None:
        """Why a delta cannot be taken during the warm start, or None if it can (or it is over)."""
        if not self.active:
            return None
        holder = self.current_holder(arrival.now)
        if holder and arrival.client_id != holder:
            return "warming_up", f"warm start: {holder} trains alone until {self.until_steps} local steps"
        if arrival.staleness > 0:
            return "stale", "during the warm start only deltas on the current version are taken"
        return None

    def admitted(self, arrival: Arrival) -> None:
        if self.active:
            self.holder, self.holder_seen = arrival.client_id, arrival.now

    def save_state(self) -> dict[str, Any]:
        return {"warm_start": {"holder": self.holder, "holder_seen": self.holder_seen}}

    def load_state(self, state: dict[str, Any]) -> None:
        data = state.get("warm_start") or {}
        self.holder = str(data.get("holder", ""))
        self.holder_seen = float(data.get("holder_seen", 0.0))
