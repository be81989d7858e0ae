"""The run's mode, derived in one place from the outer strategy, and the round mode it plans.

``RunMode.SYNC`` (``--strategy sync``): synchronous DiLoCo; every round waits for all clients
(:mod:`coordinator.sync_round`). ``RunMode.ASYNC`` (every other strategy): nobody waits; with
``--warm-start-steps`` the run begins with single-worker training (:mod:`coordinator.warm_start`).
What a client must do next round is the plan's :class:`shared.round_plan.RoundMode`, from
:func:`round_mode` and nowhere else.
"""

from __future__ import annotations

from enum import Enum

from shared.round_plan import RoundMode


class RunMode(str, Enum):
    ASYNC = "async"
    SYNC = "sync"

    @classmethod
    def of(cls, strategy: str) -> RunMode:
        """The mode of an outer strategy: ``sync`` is synchronous, every other one asynchronous."""
        return cls.SYNC if strategy == "sync" else cls.ASYNC


def round_mode(mode: RunMode, *, dylu: bool, warming_up: bool) -> RoundMode:
    """What the plan tells clients: wait for each round, train alone, size by speed, or run H."""
    if mode is RunMode.SYNC:
        return RoundMode.SYNC
    if warming_up:
        return RoundMode.WARM_START
    return RoundMode.DYLU if dylu else RoundMode.FIXED
