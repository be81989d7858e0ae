"""Rounds that start before the last delta is in a snapshot (``--overlap``).

Without it a client waits, after each send, until a snapshot includes its delta: starting the next
round from a base without its own last delta would make the next delta repeat most of it, and the
coordinator would count that work twice. The wait is the commit's latency (seconds for a large
model), idle on a GPU box.

With it the next round starts at once, from the newest snapshot *moved by the client's own
in-flight deltas as the coordinator will move θ when they arrive*: θ_start = θ_snapshot −
Σ s_i·ĝ_i over its deltas the snapshot does not hold yet, ĝ_i the delta as sent (decoded from its
codec bytes) and s_i the plan's ``arrival_share`` (ε(1 + β)/N for edn) times the delta's share of
a full round (steps/H: the coordinator's default compute weight). The next delta then holds new
work only; it names the delta it was stacked on (``DeltaMessage.stacked_on``), so the coordinator
takes it on the same base (``coordinator.admission.OnePerBase``). The momentum step a closing
buffer cycle adds later is not anticipated, and a stacked delta that the coordinator rejects
leaves its share in the base until the next snapshot: both only move where a round starts.

At most :data:`MAX_IN_FLIGHT` of a client's deltas are pending while a round trains (each holds
a copy of the model); the oldest is waited for (``InclusionWait.until_included``) before another
goes out, and a stalled coordinator holds the client there (:meth:`Overlap.wait_for_room`).
Each round's report waits for its delta's verdict, read without blocking at the start of the
next rounds, so round lines come out one round late, each with its verdict.

A stacked round starts before the other clients' deltas of the same cycle are in θ: it trains
from a base they will move. So the round watches, every :data:`LOOK_S` between two steps, for the
verdict of the delta its base was moved by (:class:`MidRoundRebase`); once that delta is in a
snapshot (or refused), the round's progress so far moves onto that snapshot
(:meth:`LocalTrainer.rebase`: θ_local += θ_new − θ_base, the patches or the whole snapshot, the
inner optimizer's state kept) and the round goes on from there, its delta then tagged with that
version. On a virtual clock this halves what stacking costs per update and beats waiting on the
wall clock (``benchmarks/overlap.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from client.fetcher import RECENT_VERSION_S, SnapshotFetcher
from client.inclusion import InclusionWait, settled_seq
from client.replica import Replica
from client.report import DeltaFate, RoundReport
from client.uploader import Upload
from shared.errors import SnapshotError
from shared.local_round import LocalTrainer
from shared.verdict import Verdict

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1  # deltas not yet known to be in a snapshot while a round trains
LOOK_S = 0.5  # a stacked round reads its verdicts at most this often (one Redis command each)


@dataclass
class InFlight:
    """One sent delta whose snapshot or verdict is not known yet, with its round's report."""

    run_id: str
    seq: int
    share: float  # how far θ moves along ``delta`` at its arrival (plan's arrival_share × steps/H)
    delta: dict[str, torch.Tensor]  # as sent: decoded from its codec bytes, on the CPU
    report: RoundReport
    verdict: Verdict | None = None
    included: int | None = None  # the snapshot version that holds it (or settled it: a manifest)
    given_up: bool = False  # waited for in vain: its fate stays unknown
    upload: Upload | None = None  # how sending it went, once known (sent from a thread: client/sender.py)

    @property
    def rejected(self) -> bool:
        return self.verdict is not None and not self.verdict.applied

    @property
    def pending(self) -> bool:
        """Not known to be in a snapshot, nor rejected, nor given up on: still in flight."""
        return not (self.rejected or self.included is not None or self.given_up)

    @property
    def settled(self) -> bool:
        """Its report may go: the verdict is in (a manifest may show the snapshot first: its verdict
        is written just after it), or it was given up on."""
        return self.given_up or (self.verdict is not None and not self.pending)

    def in_base(self, run_id: str, version: int) -> bool:
        """Snapshot ``version`` of ``run_id`` holds it (or it never will: rejected, another run)."""
        return (self.run_id != run_id or self.rejected or self.given_up
                or (self.included is not None and self.included <= version))

    def final_report(self) -> RoundReport:
        report = replace(self.report, fate=DeltaFate(self.verdict, self.included))
        if self.upload is not None:  # sent from a thread: what the broker said of it
            report = replace(report, sent=self.upload.confirmed, sent_bytes=self.upload.body_bytes)
        return report


class Overlap:
    """The in-flight deltas of one client, and which of them its current base was moved by."""

    def __init__(self, waits: InclusionWait) -> None:
        self.waits = waits
        self.in_flight: list[InFlight] = []
        self._base_key: tuple[str, int] | None = None  # (run id, version) of the base moved
        self._folded: set[int] = set()  # seqs of the in-flight deltas that moved it

    @property
    def active(self) -> bool:
        return bool(self.in_flight)

    def add(self, entry: InFlight) -> None:
        self.in_flight.append(entry)

    def uploaded(self, run_id: str, seq: int, upload: Upload) -> None:
        """How sending delta ``seq`` went (one sent behind a round: once that is done); one in
        flight that was never confirmed (a stop gave up on it) will have no verdict: it is given
        up on."""
        for entry in self.in_flight:
            if (entry.run_id, entry.seq) == (run_id, seq):
                entry.upload = upload
                entry.given_up = entry.given_up or not upload.confirmed

    def learn(self, *, run_id: str, version: int, progress: dict[str, object]) -> None:
        """What the verdicts written since the last read (one read that does not block) and the
        base's manifest (its ``progress``: each client's newest settled seq) say of the in-flight
        deltas: applied in a snapshot, or rejected."""
        self.waits.read_verdicts(0.0)
        settled = settled_seq(progress, self.waits.client_id)
        for entry in self.in_flight:
            if entry.run_id != run_id:  # another run took over: its fate will never be told
                entry.given_up = True
                continue
            self._take_verdict(entry)
            if entry.included is None and not entry.rejected and settled >= entry.seq:
                entry.included = version

    def _take_verdict(self, entry: InFlight) -> None:
        """The entry's verdict, if one was read and it has none yet (with the snapshot it names)."""
        verdict = self.waits.seen.get((entry.run_id, entry.seq))
        if verdict is not None and entry.verdict is None:
            entry.verdict = verdict
            if verdict.applied and verdict.version >= 0:
                entry.included = verdict.version

    def stack(self, trainer: LocalTrainer, *, run_id: str, version: int, fresh_base: bool) -> int:
        """Move the trainer's base (snapshot ``version`` of ``run_id``) by the in-flight deltas it
        does not hold and it was not moved by yet; return the newest seq it is now stacked on (-1:
        none). ``fresh_base``: the base was just loaded from the snapshot."""
        if fresh_base or self._base_key != (run_id, version):
            self._base_key, self._folded = (run_id, version), set()
        moved = False
        for entry in self.in_flight:
            if entry.in_base(run_id, version) or entry.seq in self._folded:
                continue
            trainer.stack_on_base(entry.delta, entry.share)
            self._folded.add(entry.seq)
            moved = True
        if moved:
            trainer.reset_to_base()
        return max(self._folded, default=-1)

    @property
    def stacked_on(self) -> int:
        """The newest in-flight seq the current base was moved by (-1: none)."""
        return max(self._folded, default=-1)

    def landed(self, run_id: str) -> int | None:
        """Whether the deltas the base was moved by are settled, from the verdicts written since
        the last read (one read that does not block): None while one is still on the way; else
        the newest snapshot version that holds one of them, or -1 if none of them made it in
        (rejected, given up on): a round may then move onto that snapshot (:meth:`rebased`)."""
        if not self._folded or self._base_key is None or self._base_key[0] != run_id:
            return None
        self.waits.read_verdicts(0.0)
        folded = [entry for entry in self.in_flight if entry.seq in self._folded]
        for entry in folded:
            self._take_verdict(entry)
        if any(entry.pending for entry in folded):
            return None
        return max((entry.included for entry in folded if entry.included is not None), default=-1)

    def rebased(self, run_id: str, version: int) -> None:
        """The trainer's base is now snapshot ``version`` of ``run_id``, moved by none of the
        in-flight deltas (a round moved onto it mid-way)."""
        self._base_key, self._folded = (run_id, version), set()

    def settled_reports(self, *, force: bool = False) -> list[RoundReport]:
        """The reports of the oldest in-flight deltas whose fate is known (all of them with
        ``force``: a stop, another run), in order; they are forgotten."""
        done: list[RoundReport] = []
        while self.in_flight and (force or self.in_flight[0].settled):
            entry = self.in_flight.pop(0)
            self._folded.discard(entry.seq)
            done.append(entry.final_report())
        return done

    def reports_after(self, report: RoundReport, within_s: float) -> list[RoundReport]:
        """The round reports to hand out after ``report``'s round: itself, unless its delta is in
        flight (its report waits for its verdict), after those of earlier in-flight deltas whose
        fate is known by now (all of them, waited for up to ``within_s`` each, after a round that
        did not overlap)."""
        if any(entry.report is report for entry in self.in_flight):
            return self.settled_reports()
        return [*self.drain(within_s), report]

    def drain(self, within_s: float) -> list[RoundReport]:
        """Every in-flight delta's report, each waited for (bounded by ``within_s``) until its
        fate is known: before a round that does not overlap, and when the client stops."""
        for entry in self.in_flight:
            if not entry.settled:
                self._wait_for(entry, within_s)
        return self.settled_reports(force=True)

    def wait_for_room(self, within_s: float, *, poll_s: float, on_notice: Callable[[str], None]) -> None:
        """While more than :data:`MAX_IN_FLIGHT` deltas are pending, wait (bounded by ``within_s``
        each) for the oldest. One whose fate does not come in time is given up on, once a version
        newer than the newest delta's base shows up, however long that takes (until a stop): a
        stalled coordinator holds an overlapping client to two deltas in flight, as it holds
        every client to one (``InclusionWait.for_newer_base``)."""
        for entry in self.in_flight:
            if sum(e.pending for e in self.in_flight) <= MAX_IN_FLIGHT:
                return
            if not entry.pending:
                continue
            self._wait_for(entry, within_s)
            if entry.given_up:
                newest = self.in_flight[-1]
                self.waits.for_newer_base(run_id=newest.run_id, last_base=newest.report.base_version,
                                          poll_s=poll_s, on_notice=on_notice)

    def _wait_for(self, entry: InFlight, within_s: float) -> None:
        known = self.waits.seen.get((entry.run_id, entry.seq))
        if known is not None and (not known.applied or known.version >= 0):
            entry.verdict, entry.included = known, (known.version if known.applied else None)
            return
        fate = self.waits.until_included(run_id=entry.run_id, seq=entry.seq,
                                         base_version=entry.report.base_version, within_s=within_s)
        entry.verdict = fate.verdict or entry.verdict
        entry.included = fate.version if fate.version is not None else entry.included
        entry.given_up = not entry.settled


class MidRoundRebase:
    """Between the steps of a round, moves it onto a newer snapshot, its progress carried: for a
    stacked round, the one that settles the in-flight delta its base was moved by, as soon as the
    verdict says so (module docstring); with ``follow``, any newer version, by its patches."""

    def __init__(self, overlap: Overlap, replica: Replica, fetcher: SnapshotFetcher, *,
                 on_read: Callable[[int, int], None], follow: bool = False) -> None:
        self.overlap = overlap
        self.replica = replica
        self.fetcher = fetcher
        self.on_read = on_read  # (version, bytes read) of each snapshot or patches read
        self.follow = follow
        self._next_look = 0.0
        self.moved = 0  # times a round moved onto a newer base

    def between_steps(self) -> None:
        """For LocalTrainer.train: look (at most every LOOK_S, one Redis command) and move."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + LOOK_S
        run_id, held = self.replica.run_id, self.replica.version
        if run_id is None or held is None:
            return
        try:
            if self.overlap.stacked_on >= 0:  # its base holds an in-flight delta: wait for its fate
                landed = self.overlap.landed(run_id)
                if landed is not None:
                    self._move(run_id, held, landed, whole=True)
            elif self.follow:
                newest = self.fetcher.current_version()
                if newest is not None and newest > held:
                    self._move(run_id, held, newest, whole=False)
        except SnapshotError as exc:  # the round goes on from the base it has
            log.warning("could not move the round onto the newer snapshot: %s", exc)

    def _move(self, run_id: str, held: int, landed: int, *, whole: bool) -> None:
        """Onto version ``landed`` (-1: the newest, its delta refused), or a newer one when
        following; read whole if its patches are not there and ``whole``."""
        trainer = self.replica.trainer
        assert trainer is not None
        current = (self.fetcher.current_version(max_age_s=RECENT_VERSION_S)
                   if landed < 0 or self.follow else None)
        version = max(landed, held, -1 if current is None else current)
        if version <= held:  # refused and nothing newer: only its share comes off the base
            trainer.unstack_base(carry=True)
            self.overlap.rebased(run_id, held)
            return
        read = self.replica.catch_up(self.fetcher, version, carry=True)
        if not read:
            if not whole and self.replica.version is not None:
                return  # no patches to it (a whole read each time would cost more than it gives)
            snapshot = self.fetcher.read_latest()
            if not self.replica.rebase_onto(snapshot):
                return  # another run took over: this round's delta will be refused as its run's
            read = snapshot.manifest.total_bytes
        assert self.replica.version is not None
        self.overlap.rebased(run_id, self.replica.version)
        self.on_read(self.replica.version, read)
        self.moved += 1
        log.debug("round moved onto version %d mid-way", self.replica.version)
