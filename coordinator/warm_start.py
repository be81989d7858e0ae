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

from dataclasses import dataclass
from typing import Any


@dataclass
class WarmStart:
    until_steps: int
    handover_s: float = 30.0
    holder: str = ""
    holder_seen: float = 0.0  # unix time of the holder's last applied delta

    def active(self, steps_done: int) -> bool:
        return steps_done < self.until_steps

    def current_holder(self, now: float) -> str:
        """The holder the plan names: nobody once it went quiet for ``handover_s``."""
        return self.holder if self.holder and now - self.holder_seen <= self.handover_s else ""

    def refuse(self, client_id: str, staleness: int, now: float) -> tuple[str, str] | None:
        """Why a delta cannot be taken during the warm start, or None if it can."""
        holder = self.current_holder(now)
        if holder and client_id != holder:
            return "warming_up", f"warm start: {holder} trains alone until {self.until_steps} local steps"
        if staleness > 0:
            return "stale", "during the warm start only deltas on the current version are taken"
        return None

    def took(self, client_id: str, now: float) -> None:
        self.holder, self.holder_seen = client_id, now

    def to_json(self) -> dict[str, Any]:
        return {"holder": self.holder, "holder_seen": self.holder_seen}

    def load_json(self, data: dict[str, Any]) -> None:
        self.holder = str(data.get("holder", ""))
        self.holder_seen = float(data.get("holder_seen", 0.0))
