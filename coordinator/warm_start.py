"""Warm start: the run's first local steps are ordinary single-worker training, then Local-SGD.

Asynchronous Local-SGD is measured in the paper from a model pretrained by ordinary training, and
from scratch it gains less from extra workers: early on, consecutive deltas are large and differ,
so averaging stale ones costs more than the extra compute brings (docs/BENCHMARKS.md). With
``--warm-start-steps K`` the coordinator runs that first phase itself:

* one client, the *holder*, trains alone; each of its deltas replaces θ by the holder's local
  model (``θ -= g``: no outer momentum, no averaging), so the phase is plain training in rounds;
* the holder is the operator's choice (``serve --warm-start-client ID``, the ``holder``
  argument); the plan names it, and other clients wait instead of training rounds that would be
  refused (``warming_up``), however long it takes the holder to come;
* with no holder named, the holder is whoever sends the first delta based on the current version
  (a warning says so at start: on a run open to strangers, name one); if it sends nothing for
  ``handover_s``, the plan names nobody and the next client whose delta arrives on the current
  version takes over;
* once the run has K local steps in all, the plan names nobody and the configured outer strategy
  takes over from the warmed-up θ, with its momentum starting at zero.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.admission import Arrival, Refusal
from coordinator.progress import RunProgress

log = logging.getLogger(__name__)


class WarmStart:
    """The warm start's state, and the admission rule that lets only its holder in while it lasts.

    ``holder``: the client that trains alone, chosen by the operator; "" lets the first sender
    hold it (a hook: a caller may pass, say, the first invited volunteer instead).
    """

    def __init__(self, until_steps: int, *, progress: RunProgress, handover_s: float = 30.0,
                 holder: str = "") -> None:
        self.until_steps = until_steps
        self.progress = progress  # the run's local steps so far decide when the warm start ends
        self.handover_s = handover_s
        self.chosen = holder  # fixed for the whole warm start when set
        self.holder = holder
        self.holder_seen = 0.0  # unix time of the holder's last applied delta
        if self.active and not holder:
            log.warning("warm start: no --warm-start-client named, so whoever sends the first delta "
                        "holds the warm start and replaces the model; name the holder on a run open "
                        "to strangers")

    @property
    def active(self) -> bool:
        return self.progress.local_steps < self.until_steps

    def current_holder(self, now: float) -> str:
        """The holder the plan names: the chosen one, else nobody once it went quiet for ``handover_s``."""
        if self.chosen:
            return self.chosen
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
        self.holder = self.chosen or str(data.get("holder", ""))  # the operator's choice of today wins
        self.holder_seen = float(data.get("holder_seen", 0.0))
