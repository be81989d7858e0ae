"""What the worker says while it works, for whoever watches it (the live display).

The CLI hands a :class:`WorkerEvents` to the worker; the base class does nothing, so a watcher
overrides only what it needs. Every method is called on the worker's thread, between training
steps or network calls, and must return quickly. The round's end is not here: it is the
:class:`~client.report.RoundReport` that ``Worker.run(on_round=...)`` hands out, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch comes with it, and the CLI imports it only once the options are good
    from shared.local_round import StepProgress


@dataclass(frozen=True)
class RoundStart:
    """A round about to train: ``planned_steps`` from ``base_version`` of run ``run`` (id ``run_id``)."""

    round: int  # 1-based count of rounds this process started
    run: str
    run_id: str
    client_id: str
    base_version: int
    planned_steps: int


class WorkerEvents:
    """The worker's progress, as it happens. Subclass and override; each default does nothing."""

    def started(self, run: str, client_id: str) -> None:
        """The worker begins: it contacts the servers of run ``run`` as client ``client_id``."""

    def round_started(self, start: RoundStart) -> None:
        """Training of a round begins."""

    def step(self, progress: StepProgress) -> None:
        """Progress within the round: after its first step, then about every half second."""

    def snapshot_read(self, version: int, nbytes: int) -> None:
        """A snapshot of ``nbytes`` (its parameters) was downloaded and verified."""

    def sending(self, nbytes: int) -> None:
        """The round's delta (``nbytes`` encoded) is being published."""

    def paused(self, reason: str) -> None:
        """Training is paused (``reason``: outside the schedule, on battery, the machine is in use:
        by load, input or another GPU process)."""

    def abandoned(self, reason: str) -> None:
        """The round in hand was abandoned without a pause (``reason``: over --max-memory); the next
        one starts at once."""

    def resumed(self, paused_s: float) -> None:
        """Training resumes after ``paused_s`` seconds of pause."""
