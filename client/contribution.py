"""This machine's lifetime contribution: what ``asyncloco-client stats`` shows.

Kept in ``contribution.json`` in the client's state dir (beside ``client-id`` and ``seq-*.json``:
see :mod:`client.identity`), shared by every client process that uses that state dir, and updated
after each round once its verdict is in (or the wait for it ran out)::

    {"format": 1, "first_seen": UNIX_S, "last_seen": UNIX_S,
     "total": TALLY,
     "runs": {RUN_ID: {"run": NAME, "first_seen": UNIX_S, "last_seen": UNIX_S, "tally": TALLY}}}

    TALLY = {"rounds", "deltas_sent", "applied", "rejected": {REASON: n}, "unjudged", "local_steps",
             "tokens", "compute_s", "bytes_up", "bytes_down"}

Each update reads, adds and writes the file whole (temp file + fsync + ``os.replace``) under a
lock, so two processes never lose each other's rounds and a crash leaves the old or the new file.
The figures are this machine's own account, for its owner: the coordinator's (``volunteers``,
the dashboard) is the one that counts for the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from client.identity import locked_file
from client.report import RoundReport
from shared.errors import ConfigError
from shared.files import write_atomically

log = logging.getLogger(__name__)

FILE_NAME = "contribution.json"
FORMAT = 1
MAX_RUNS_KEPT = 100  # runs listed one by one (the newest); the total keeps counting all of them
MAX_REASONS = 32  # distinct rejection reasons kept per tally; more are counted under "other"

_INTS = ("rounds", "deltas_sent", "applied", "unjudged", "local_steps", "tokens", "bytes_up", "bytes_down")


@dataclass(frozen=True)
class Tally:
    """Rounds and what came of them. ``unjudged``: deltas sent whose verdict did not come while
    the client waited; ``rejected``: by the coordinator's reason (``stale``, ``already_sent``...)."""

    rounds: int = 0
    deltas_sent: int = 0
    applied: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    unjudged: int = 0
    local_steps: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def plus(self, report: RoundReport) -> Tally:
        """This tally with one more round."""
        verdict = report.fate.verdict if report.sent else None
        rejected = dict(self.rejected)
        if verdict is not None and not verdict.applied:
            reason = verdict.reason if verdict.reason in rejected or len(rejected) < MAX_REASONS else "other"
            rejected[reason] = rejected.get(reason, 0) + 1
        return Tally(
            rounds=self.rounds + 1,
            deltas_sent=self.deltas_sent + int(report.sent),
            applied=self.applied + int(verdict is not None and verdict.applied),
            rejected=rejected,
            unjudged=self.unjudged + int(report.sent and verdict is None),
            local_steps=self.local_steps + report.steps,
            tokens=self.tokens + report.tokens,
            compute_s=self.compute_s + report.compute_s,
            bytes_up=self.bytes_up + (report.sent_bytes if report.sent else 0),
            bytes_down=self.bytes_down + report.received_bytes,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {name: getattr(self, name) for name in _INTS}
        doc["rejected"] = dict(sorted(self.rejected.items()))
        doc["compute_s"] = round(self.compute_s, 3)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Tally:
        """Read a tally back; ValueError if anything is missing or of the wrong kind."""
        if not isinstance(doc, dict):
            raise ValueError("a tally is not an object")
        values: dict[str, Any] = {}
        for name in _INTS:
            value = doc.get(name, 0)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} is not a count")
            values[name] = value
        compute_s = doc.get("compute_s", 0.0)
        if not (isinstance(compute_s, (int, float)) and math.isfinite(compute_s) and compute_s >= 0):
            raise ValueError("compute_s is not seconds")
        rejected = doc.get("rejected", {})
        if not (isinstance(rejected, dict) and all(
                isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in rejected.items())):
            raise ValueError("rejected is not counts by reason")
        return cls(compute_s=float(compute_s), rejected=rejected, **values)

    def describe(self) -> list[str]:
        """Two lines for ``stats``: the rounds and their fates, then the work and the traffic."""
        fates = f"applied {self.applied}, rejected {self.rejected_total}"
        if self.rejected:
            fates += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) + ")"
        if self.unjudged:
            fates += f", no verdict {self.unjudged}"
        return [
            f"rounds {self.rounds}, deltas sent {self.deltas_sent}: {fates}",
            f"local steps {self.local_steps:,}, tokens {si_prefixed(self.tokens)}, compute "
            f"{compute_time(self.compute_s)}, sent {si_prefixed(self.bytes_up)}B, "
            f"received {si_prefixed(self.bytes_down)}B",
        ]


@dataclass(frozen=True)
class RunContribution:
    """This machine's part in one run (``run_id``: a run restarted afresh is another)."""

    run: str
    run_id: str
    first_seen: float
    last_seen: float
    tally: Tally = field(default_factory=Tally)


@dataclass(frozen=True)
class Contribution:
    """Everything in ``contribution.json``: the total, and each run (oldest first)."""

    first_seen: float | None = None  # Unix time of the first round recorded; None: none yet
    last_seen: float | None = None
    total: Tally = field(default_factory=Tally)
    runs: tuple[RunContribution, ...] = ()

    def plus(self, report: RoundReport, now: float) -> Contribution:
        """This contribution with one more round, of run ``report.run_id``, ending ``now``."""
        runs = {r.run_id: r for r in self.runs}
        old = runs.pop(report.run_id, None) or RunContribution(report.run, report.run_id, now, now)
        runs[report.run_id] = replace(old, run=report.run or old.run, last_seen=now,
                                      tally=old.tally.plus(report))  # last: the newest
        kept = tuple(runs.values())[-MAX_RUNS_KEPT:]
        return Contribution(first_seen=self.first_seen if self.first_seen is not None else now,
                            last_seen=now, total=self.total.plus(report), runs=kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "total": self.total.to_json(),
            "runs": {r.run_id: {"run": r.run, "first_seen": r.first_seen, "last_seen": r.last_seen,
                                "tally": r.tally.to_json()} for r in self.runs},
        }

    @classmethod
    def from_json(cls, doc: Any) -> Contribution:
        """Read the file's document back; ValueError if it is not one."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("runs"), dict):
            raise ValueError(f"not a format-{FORMAT} contribution document")
        runs = []
        for run_id, entry in doc["runs"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("run"), str)):
                raise ValueError(f"run {run_id!r} is not an object with a name")
            runs.append(RunContribution(entry["run"], run_id, _when(entry.get("first_seen")),
                                        _when(entry.get("last_seen")), Tally.from_json(entry.get("tally"))))
        first, last = doc.get("first_seen"), doc.get("last_seen")
        return cls(first_seen=None if first is None else _when(first),
                   last_seen=None if last is None else _when(last),
                   total=Tally.from_json(doc.get("total")), runs=tuple(runs))

    def lines(self) -> list[str]:
        """What ``asyncloco-client stats`` prints: the total, then each run, newest first."""
        if self.first_seen is None or self.last_seen is None:
            return ["no rounds recorded yet on this machine"]
        out = [f"this machine, {_day(self.first_seen)} to {_day(self.last_seen)}, all runs:"]
        out += ["  " + line for line in self.total.describe()]
        for run in reversed(self.runs):
            out.append(f"run {run.run!r} (id {run.run_id}), {_day(run.first_seen)} to {_day(run.last_seen)}:")
            out += ["  " + line for line in run.tally.describe()]
        return out


class ContributionBook:
    """``contribution.json`` in ``state_dir``: :meth:`read` it, :meth:`record` a round in it.

    ``clock`` (Unix seconds) stamps the rounds; tests hand in their own.
    """

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILE_NAME
        self._lock_path = self.state_dir / (FILE_NAME + ".lock")
        self.clock = clock
        self._write_failed = False  # a failed write is warned about once, not every round
        self._last: Contribution | None = None  # what the last record() returned

    def read(self) -> Contribution:
        """What is recorded (empty if nothing yet); :class:`ConfigError` if the file is unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Contribution()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return Contribution.from_json(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path} is unreadable ({exc})") from None

    def record(self, report: RoundReport) -> Contribution:
        """Add one finished round and return the new contribution. Never raises for the file: an
        unreadable one is set aside (``.bad``) and counting starts afresh; a failed write is
        logged once and the round is added to what the last call returned, in memory only."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with locked_file(self._lock_path):
                try:
                    current = self.read()
                except ConfigError as exc:
                    log.warning("%s; setting it aside as %s.bad and counting afresh", exc, FILE_NAME)
                    self.path.replace(self.path.with_name(FILE_NAME + ".bad"))
                    current = Contribution()
                updated = current.plus(report, self.clock())
                write_atomically(self.path, json.dumps(updated.to_json(), indent=1).encode())
        except OSError as exc:
            if not self._write_failed:
                log.warning("cannot record this machine's contribution in %s (%s); training goes on",
                            self.path, exc.strerror or exc)
                self._write_failed = True
            updated = (self._last or Contribution()).plus(report, self.clock())
        else:
            self._write_failed = False
        self._last = updated
        return updated


def _when(value: Any) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError("a time is not Unix seconds")
    return float(value)


def _day(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M")


def compute_time(seconds: float) -> str:
    """``42.0 min`` below an hour, ``3.42 h`` from there on."""
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def si_prefixed(value: float) -> str:
    """``12.3M``: a count with an SI prefix."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{prefix}"
    return f"{value:.0f}"
