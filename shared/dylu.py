"""Dynamic Local Updates: each client sizes its round to its own measured speed.

``H_i = max(H_min, floor(v_i / v_max · H))`` with ``v`` in local steps per second and ``H`` the
steps the fastest active client runs. Every round then takes about ``H / v_max`` seconds whatever
the machine, so a slow box neither holds anyone up nor sends hopelessly stale work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.protocol import RoundMode, RoundPlan


def local_steps_for(plan: RoundPlan, steps_per_s: float | None) -> int:
    """Steps this client should run this round, from the plan and its own measured speed.

    Outside ``RoundMode.DYLU``, or before anything is measured, everybody runs ``plan.local_steps``.
    """
    if plan.mode is not RoundMode.DYLU or not steps_per_s or plan.fastest_steps_per_s <= 0:
        return plan.local_steps
    ratio = min(1.0, steps_per_s / plan.fastest_steps_per_s)
    return max(plan.min_local_steps, math.floor(ratio * plan.local_steps))


def round_time_budget_s(plan: RoundPlan) -> float | None:
    """Wall time a round should take (``H / v_max``), or None while no speed is known."""
    if plan.mode is not RoundMode.DYLU or plan.fastest_steps_per_s <= 0:
        return None
    return plan.local_steps / plan.fastest_steps_per_s


@dataclass
class SpeedMeter:
    """Exponential moving average of local steps per second over rounds.

    ``alpha`` weighs the newest round; lower it if speeds jitter (shared machines), raise it if a
    client's speed changes for good (another job started) and the plan reacts too slowly.
    """

    alpha: float = 0.5
    steps_per_s: float | None = None

    def update(self, steps: int, seconds: float) -> float | None:
        if steps > 0 and seconds > 0:
            speed = steps / seconds
            if self.steps_per_s is None:
                self.steps_per_s = speed
            else:
                self.steps_per_s = self.alpha * speed + (1 - self.alpha) * self.steps_per_s
        return self.steps_per_s
