"""What the worker tells its caller: one :class:`RoundReport` per round, one :class:`RunSummary` at the end.

Both are plain values with a ``line()`` for the terminal; the worker itself never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.protocol import round_timings
from shared.verdict import Verdict


@dataclass(frozen=True)
class DeltaFate:
    """What became of a sent delta, as far as the client learnt while it waited: the coordinator's
    verdict (None: none came) and the first snapshot version seen to include it (None: none yet)."""

    verdict: Verdict | None = None
    version: int | None = None

    def describe(self) -> str:
        """``applied v=12``, ``rejected: stale (...)``, ``in v=12`` (a coordinator that writes no
        verdicts), ``applied, not yet in a snapshot`` or ``outcome=?``."""
        if self.verdict is not None and not self.verdict.applied:
            return self.verdict.describe()
        if self.verdict is not None:
            return "applied" + (", not yet in a snapshot" if self.version is None else f" v={self.version}")
        return f"in v={self.version}" if self.version is not None else "outcome=?"


@dataclass(frozen=True)
class RoundReport:
    """What one finished round did; ``line()`` is the progress line the CLI prints.

    Besides ``compute_s``, a round's wall time goes to ``fetch_s`` (reading the plan, the version
    and, when it changed, the snapshot, before training), ``encode_s`` (the pseudo-gradient, error
    feedback and codec), ``upload_s`` (publishing until the broker confirmed every part) and
    ``wait_s`` (waiting on the coordinator: for a newer base before training, for the delta's
    verdict and snapshot, and for its buffer cycle to close, after sending). The next delta
    carries them to the coordinator (:meth:`timings`), whose ``status`` shows them as reported.
    """

    round: int  # 1-based count of rounds this process ran
    seq: int
    base_version: int
    planned_steps: int  # H_i this round aimed for
    steps: int  # steps actually run (fewer if stopped or out of time budget)
    train_loss: float
    compute_s: float
    tokens: int
    sent_bytes: int
    sent: bool  # False only if a stopping client gave up on the upload
    upload_s: float
    staleness: int | None  # current version just after the publish minus base_version
    fate: DeltaFate = DeltaFate()  # the coordinator's verdict, if it came while the client waited
    run: str = ""  # the run's name
    run_id: str = ""  # and its id (a run restarted afresh gets a new one)
    received_bytes: int = 0  # snapshot parameters downloaded for this round (0: the replica had them)
    fetch_s: float = 0.0
    encode_s: float = 0.0
    wait_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s > 0 else 0.0

    def timings(self) -> dict[str, float]:
        """This round's seconds as the next delta's ``previous_timings`` carry them."""
        return round_timings(fetch_s=self.fetch_s, encode_s=self.encode_s, upload_s=self.upload_s,
                             wait_s=self.wait_s)

    def line(self) -> str:
        stale = "?" if self.staleness is None else str(self.staleness)
        sent = f"{self.sent_bytes / 1e6:.1f}MB" if self.sent else "NOT-SENT"
        return (
            f"round {self.round}  v={self.base_version}  H={self.steps}  loss={self.train_loss:.3f}  "
            f"tok/s={self.tokens_per_s:.0f}  sent={sent}  fetch={self.fetch_s:.2f}s "
            f"encode={self.encode_s:.2f}s upload={self.upload_s:.2f}s wait={self.wait_s:.2f}s  "
            f"staleness={stale}"
            + (f"  {self.fate.describe()}" if self.sent else "")
        )


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`client.worker.Worker.run` did in total, and why it stopped."""

    client_id: str
    run_id: str | None
    rounds: int
    deltas_sent: int
    next_seq: int | None
    stopped_by: str  # "max_rounds", "max_seconds", "max_hours" or "stop"
    applied: int = 0  # deltas the coordinator said it applied
    rejected: int = 0  # and rejected

    def line(self) -> str:
        return (
            f"stopped ({self.stopped_by}): {self.rounds} rounds, {self.deltas_sent} deltas sent "
            f"as client {self.client_id}"
            + (f", next seq {self.next_seq}" if self.next_seq is not None else "")
            + (f"; {self.applied} applied, {self.rejected} rejected" if self.applied or self.rejected else "")
        )


@dataclass
class Tally:
    """The round reports handed out so far: each passed on to ``on_round``, and counted."""

    on_round: Callable[[RoundReport], None] | None = None
    sent: int = 0
    applied: int = 0
    rejected: int = 0

    def add(self, report: RoundReport) -> None:
        verdict = report.fate.verdict
        self.sent += int(report.sent)
        self.applied += int(verdict is not None and verdict.applied)
        self.rejected += int(verdict is not None and not verdict.applied)
        if self.on_round is not None:
            self.on_round(report)
