"""The delta guard's direction check (:mod:`coordinator.guard`): a delta whose cosine to where
the honest deltas took θ is below ``min_cosine`` points against it, and is refused as
``against_momentum`` (a sign-flipped delta does; an honest one keeps a positive cosine).

Where the deltas took θ is the senders' reference (:mod:`coordinator.reference`, one share per
recent sender) once three named senders voted, and the server's momentum until then. Judged by the
reference, only ``min_cosine`` and forgiveness hold: the spread and the valve below exist for the
momentum, which overshoots and which a liar holding most of the compute weight can turn; let
through by them, a fast sign-flipper's deltas near 0 wrecked real runs (docs/SECURITY.md).

With ``distrust`` (the guard's default), judged by the reference, a sender that has pointed against
it in most of its last ``forgive_after`` judgements is **distrusted**: its delta passes only at a
cosine of at least the median of the recent accepted ones (an honest delta's typical cosine), and
is held back below that (counted as ``direction_distrusted`` where the plain rule would have
let it in, whole or damped). Late in a run the fastest honest client's delta points a little
against the slower ones' consensus, so a sign-flipper's deltas, refused round after round, creep
up to a cosine near 0 and then above it; let in there, in real runs, one moved θ uphill, the
honest deltas turned against the reference and the liar's were let in from then on
(docs/SECURITY.md). The mirror of forgiveness: the record that forgives an honest dip holds the
liar back, and it clears once at least half of the sender's last judgements reach the median.
The fastest *honest* client looks the same: late in a run its cosines hover around 0 and a few
dips in a row make it distrusted. So a distrusted sender's delta that the plain rule would let in
is not refused outright: its verdict is ``TRY``, and the guard lets it in only if it lowers the
loss on a batch of the operator's own data (``DescentCheck.strict``: no rise at all, and lower
than along its opposite), which no cosine can tell: an honest late correction and a sign-flipped
delta are mirror images around 0, but only one of them goes downhill (refused outright, in a real
4-client run, 24 of the honest client's deltas were lost, 11% of all). Without the trial (a guard
built without the operator's data) such a delta is refused.

Judged by the momentum, three rules keep honest volunteers in, measured on real runs
(docs/SECURITY.md, ``benchmarks/direction_replay.py``):

- **The spread**: late in a run the momentum's direction carries little signal (the median
  cosine of recent accepted deltas falls towards 0) and the freshest honest deltas point a little
  against it, correcting its overshoot. A delta is refused only below ``median − spread × σ`` of
  the recent accepted cosines (σ from their median absolute deviation), and never above
  ``min_cosine``: early in a run, when honest cosines sit well above 0, that is ``min_cosine``
  itself; a sign-flipped typical delta (its cosine the negated median) stays below it whenever
  the median is above ``spread × σ / 2``.
- **Forgiveness**: late in a run an honest round's progress is mostly noise and its cosine dips a
  little below 0 now and then. A sender whose last ``forgive_after`` directions all pointed along
  the momentum has such a dip forgiven; a sign-flipper points against it round after round and
  never is, and a liar that sends ``forgive_after`` deltas along the momentum for each one
  against it gives more than it takes.
- **The valve**: when more than half of the distinct senders of the last judgements pointed
  against the momentum the last time each was judged, the momentum overshot (or an attacker got
  into it), and refusing them would lock the honest out and keep it wrong: the check stands
  aside. Each sender's latest direction counts, refused or not, so the first honest sender to
  point back is not the one left refused while the valve opens for the rest. With ``distrust``
  (and the guard's trial), what the valve would let in is tried on the operator's data instead
  (``TRY``): a liar's early flipped delta can make the momentum, and the valve then let its next
  ones in too (a real run without a warm start, docs/SECURITY.md); only the honest go downhill.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

import torch

# Judgements the valve looks back over (a few rounds of a few senders).
DIRECTIONS_KEPT = 16
# Senders whose records are kept (the least recently heard is forgotten past this).
MAX_RECORDS = 10_000
# Accepted cosines before the spread is taken from them (fewer: min_cosine alone).
MIN_COSINES = 8
# σ of a normal distribution from its median absolute deviation
MAD_TO_SIGMA = 1.4826
# What a delta that points a little against the senders' reference moves θ by, of its weight
DAMPED_WEIGHT = 0.25
# A delta's verdicts (DirectionCheck.judge); TRY: in only if it lowers the loss on the operator's
# data (a distrusted sender's delta below the median that the plain rule would let in, whole or
# damped; one the valve would let in)
PASS, DAMP, REFUSE, TRY = "", "damp", "refuse", "try"


class DirectionCheck:
    """Judges a delta by its cosine to the centre, with the spread, forgiveness and the valve
    (module docstring); counts ``momentum_suspect`` and ``direction_forgiven`` in ``counts``. The
    caller tells it the cosines of the deltas it accepted in the end (:meth:`accepted`)."""

    def __init__(self, min_cosine: float, forgive_after: int, counts: Counter[str], *,
                 spread: float = 0.0, window: int = 64, distrust: bool = False, tries: bool = False) -> None:
        self.min_cosine = min_cosine
        self.distrust = distrust
        # the guard tries deltas on the operator's data: what the valve would let in is TRY, not PASS
        self.tries = tries
        self.forgive_after = forgive_after
        self.spread = spread
        self.counts = counts
        self.cosines: deque[float] = deque(maxlen=window)  # of the last accepted deltas, as sent
        # (sender, pointed against the momentum) of the last judgements: the valve's
        self.directions: deque[tuple[str, bool]] = deque(maxlen=DIRECTIONS_KEPT)
        # per sender, its last directions judged: True where it pointed against the momentum
        self.pointing: dict[str, deque[bool]] = {}
        # judging by the senders' reference (coordinator.reference), not the momentum: no spread,
        # no valve (None until told, so that a restored check keeps its cosines: judge_by)
        self.by_reference: bool | None = None
        self.refused_below = min_cosine  # the threshold of the last judgement (judge)
        self.distrusted = False  # whether the last judgement's sender was distrusted
        # after a TRY: whether the plain rule would have damped the delta (applied so if let in)
        self.tried_damped = False

    def accepted(self, cosine: float) -> None:
        """A delta judged at ``cosine`` passed the whole guard: its cosine joins the spread's."""
        self.cosines.append(cosine)

    def judge_by(self, reference: bool) -> None:
        """Judge by the senders' reference (True) or the momentum from now on. On a switch the
        spread and the valve start afresh (cosines to another vector are not comparable); the
        senders' records are kept."""
        if self.by_reference is not None and reference != self.by_reference:
            self.cosines.clear()
            self.directions.clear()
        self.by_reference = reference

    def least(self) -> float:
        """The cosine below which a delta points against the momentum, from the cosines of the
        recent accepted deltas: ``min(min_cosine, median − spread × σ)`` (module docstring)."""
        if not self.spread or len(self.cosines) < MIN_COSINES:
            return self.min_cosine
        median = statistics.median(self.cosines)
        sigma = MAD_TO_SIGMA * statistics.median(abs(c - median) for c in self.cosines)
        return min(self.min_cosine, median - self.spread * sigma)

    def median_cosine(self) -> float | None:
        """The median cosine of the recent accepted deltas (None before any), for status."""
        return statistics.median(self.cosines) if self.cosines else None

    def judge(self, sender: str, cosine: float) -> str:
        """Judge a delta of ``sender`` at ``cosine`` to the centre: ``PASS``, ``REFUSE``, (judged
        by the senders' reference, between the spread's threshold and ``min_cosine``) ``DAMP``, or
        (``tries``: distrusted, below the median where the plain rule would pass or damp it, or
        let in by the valve) ``TRY``, which the guard settles on the operator's data. After a
        refusal or a TRY, ``refused_below`` is the cosine the delta fell short of; after a TRY,
        ``tried_damped`` says whether the plain rule would have damped it."""
        least = self.least()
        distrusted = self.distrust and bool(self.by_reference) and self._distrusted(sender)
        if distrusted:  # it must reach an honest delta's typical cosine
            bar = max(self.min_cosine, self.median_cosine() or self.min_cosine)
        else:
            bar = self.min_cosine if self.by_reference else least
        self.refused_below = bar if distrusted else least
        self.distrusted = distrusted
        # the plain rule's damping: by the reference, below min_cosine but inside the honest spread
        damps = bool(self.by_reference) and least <= cosine < self.min_cosine
        self.tried_damped = damps
        pointed = cosine < bar
        verdict = REFUSE if pointed else PASS
        if pointed and not self.by_reference and self._momentum_suspect(sender):
            self.counts["momentum_suspect"] += 1
            verdict = TRY if self.tries else PASS
        elif pointed and self._forgiven(sender):  # never while distrusted
            self.counts["direction_forgiven"] += 1
            verdict = PASS
        elif pointed and distrusted:
            if cosine >= least:  # the plain rule would have let it in, whole or damped
                self.counts["direction_distrusted"] += 1
                verdict = TRY if self.tries else REFUSE
        elif pointed and damps:
            self.counts["damped"] += 1
            verdict = DAMP
        self.directions.append((sender, pointed))
        if sender and self.forgive_after:
            record_of(self.pointing, sender, self.forgive_after).append(pointed)
        return verdict

    def _distrusted(self, sender: str) -> bool:
        """More than half of ``sender``'s last directions (``forgive_after`` of them, at least 2
        seen) pointed against the centre."""
        seen = self.pointing.get(sender)
        return seen is not None and len(seen) >= 2 and 2 * sum(seen) > self.forgive_after

    def _forgiven(self, sender: str) -> bool:
        seen = self.pointing.get(sender)
        return seen is not None and len(seen) == self.forgive_after and not any(seen)

    def _momentum_suspect(self, sender: str) -> bool:
        latest = dict(self.directions)
        latest[sender] = True
        return len(latest) >= 2 and 2 * sum(latest.values()) > len(latest)

    def save_state(self) -> dict[str, Any]:
        """The accepted cosines and the senders' records, for a checkpoint (the valve's few
        judgements start afresh)."""
        return {"cosines": list(self.cosines),
                "pointing": {s: [int(f) for f in r] for s, r in self.pointing.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.cosines.clear()
        self.cosines.extend(float(v) for v in state.get("cosines") or [])
        self.pointing = {str(s): deque((bool(f) for f in r), maxlen=self.forgive_after or 1)
                         for s, r in (state.get("pointing") or {}).items()}


def record_of(table: dict[str, deque[bool]], sender: str, length: int) -> deque[bool]:
    """``sender``'s record in ``table`` (a new one of ``length`` if none), moved to the end: the
    most recently heard last, and the longest unheard forgotten past ``MAX_RECORDS``."""
    record = table.pop(sender, None)
    if record is None:
        if len(table) >= MAX_RECORDS:
            del table[next(iter(table))]
        record = deque(maxlen=length)
    table[sender] = record
    return record


def cosine_to(delta: Mapping[str, torch.Tensor], centre: Mapping[str, torch.Tensor] | None, *,
              delta_norm: float) -> float | None:
    """cos(delta, centre) over all tensors, given |delta| (the guard has it already); None without
    a centre or with a zero vector. Each centre tensor is read once (a ``Scaled`` centre makes it
    as it is read), for both the dot product and the centre's own norm."""
    if centre is None:
        return None
    dot = centre_sq = 0.0
    for name, g in delta.items():
        c = centre[name]
        dot += float(torch.dot(g.reshape(-1), c.reshape(-1)))
        centre_sq += float(torch.linalg.vector_norm(c)) ** 2
    centre_norm = math.sqrt(centre_sq)
    return dot / (delta_norm * centre_norm) if delta_norm > 0 and centre_norm > 0 else None
