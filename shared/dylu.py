"""Dynamic Local Updates: each client's round is sized to its speed, so every round takes about as long.

``H_i = max(H_min, floor(v_i / v_max · H))`` with ``v`` in local steps per second and ``H`` the
steps the fastest active client runs. Every round then takes about ``H / v_max`` seconds whatever
the machine, so a slow box neither holds anyone up nor sends hopelessly stale work.

The coordinator measures every speed itself (from when deltas arrive, never from what a client
says) and publishes each active client's ``H_i`` in the plan's ``assignments``; a client runs its
own assignment. A client the plan does not name yet (it just joined) runs ``H``, stopping at the
round's time budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.round_plan import RoundMode, RoundPlan


def dylu_steps(speed: float, fastest: float, local_steps: int, min_local_steps: int) -> int:
    """The DyLU rule: ``max(H_min, floor(v_i / v_max · H))``, never above ``H``; H if nothing is known."""
    if speed <= 0 or fastest <= 0:
        return local_steps
    ratio = min(1.0, speed / fastest)
    return max(min(min_local_steps, local_steps), math.floor(ratio * local_steps))


def is_assigned(plan: RoundPlan, client_id: str) -> bool:
    """True if the plan gives this client its own round length (``RoundMode.DYLU`` only)."""
    return plan.mode is RoundMode.DYLU and client_id in plan.assignments


def local_steps_for(plan: RoundPlan, client_id: str, steps_per_s: float | None) -> int:
    """Steps this client should run this round.

    In ``RoundMode.DYLU`` the coordinator's assignment for ``client_id`` when the plan has one; a
    plan that assigns nothing (the simulator's) falls back to the client's own measured speed
    ``steps_per_s``. Outside ``RoundMode.DYLU``, for a client the plan does not name, or before
    anything is measured, everybody runs ``plan.local_steps``.
    """
    if plan.mode is not RoundMode.DYLU:
        return plan.local_steps
    if client_id in plan.assignments:
        return plan.assignments[client_id]
    if plan.assignments or not steps_per_s:
        return plan.local_steps  # new to the coordinator: H, cut by the round's time budget
    return dylu_steps(steps_per_s, plan.fastest_steps_per_s, plan.local_steps, plan.min_local_steps)


def round_time_budget_s(plan: RoundPlan) -> float | None:
    """Wall time a round should take (``H / v_max``), or None while no speed is known."""
    if plan.mode is not RoundMode.DYLU or plan.fastest_steps_per_s <= 0:
        return None
    return plan.local_steps / plan.fastest_steps_per_s


def round_length(plan: RoundPlan, client_id: str, steps_per_s: float | None) -> tuple[int, int, float | None]:
    """How this client's round ends: ``(steps, min_steps, time_budget_s)`` for the trainer.

    A client the plan names (or any client outside ``RoundMode.DYLU``) runs exactly its steps
    (:func:`local_steps_for`). One the coordinator has not measured yet runs up to ``H``, but a
    slow machine stops at the round's time budget, once it has run ``min_local_steps``: even its
    first rounds take about as long as everyone's.
    """
    steps = local_steps_for(plan, client_id, steps_per_s)
    new = (plan.mode is RoundMode.DYLU and not is_assigned(plan, client_id)
           and (bool(plan.assignments) or steps_per_s is None))
    if new:
        return steps, plan.min_local_steps, round_time_budget_s(plan)
    return steps, steps, None


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
