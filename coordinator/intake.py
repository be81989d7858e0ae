"""The delta handler: decode, check, de-duplicate and apply one delta; return its outcome.

It knows nothing of AMQP: the consumer turns outcomes into acks (applied, duplicate) or dead
letters (rejected). Checks, in order, each with its own counted reason: the message decodes within
limits (:mod:`shared.protocol` names those reasons); right run; a client id we can name; not a
replay; base version neither in the future nor beyond the staleness bound (during a warm start:
from its holder and on the current version, see :mod:`coordinator.warm_start`); a known codec; exactly
the model's parameter names; payloads of exactly the right size; finite values; a norm that is not
absurd next to the model's own. Then the guard (:mod:`coordinator.guard`, inside ``apply``) may
still refuse a delta that is well-formed but an outlier, or clip it.

Whether a delta that passed those checks may touch the model *now* is up to the admission rules
(:mod:`coordinator.admission`: the rate limit, the sync round's barrier or the warm start and one
delta per base, the staleness, local-steps and assignment bounds), asked in order; how it then
moves θ is the ``apply`` callable the run state hands in (the outer optimizer's step, or the warm
start's adoption). An applied delta is credited (progress, registry) at most the local steps its
sender was assigned (:meth:`coordinator.registry.ClientRegistry.credit`).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.admission import RATE_BURST_DELTAS, RATE_DELTAS_PER_MINUTE, AdmissionRule, Arrival
from coordinator.identity import IDENTITY_REASONS, OpenSenders, SenderCheck
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry
from coordinator.verdicts import VerdictBoard
from shared.codecs import get_codec
from shared.errors import ConfigError, ProtocolError
from shared.protocol import DeltaLimits, DeltaMessage, delta_bytes_bound

log = logging.getLogger(__name__)

# Rejections that say nothing about the sender's own sequence (another run, a name we cannot use,
# a seq we cannot judge): not remembered as settled.
_NOT_SETTLED = frozenset({"wrong_run", "bad_client_id", "replayed", "seq_jump", *IDENTITY_REASONS})
# A client's sequence numbers rise by one a delta, skipping only the few whose publish a crash cut
# short; a seq this far past its newest settled one is refused (and not remembered: it would move
# the window's high-water mark).
MAX_SEQ_JUMP = 100_000
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class IntakeConfig:
    """Which deltas are accepted.

    ``max_staleness``: a delta whose base is more than this many applied deltas behind is
    discarded (0: automatic, 8 per active client and at least 32, see
    :class:`~coordinator.admission.StalenessBound`); if slow volunteers see many ``stale``
    rejections, raise it (or lower the plan's local steps). Staleness counts arrivals, not
    snapshot versions, so that it means the same under any commit cadence and in the simulator.
    ``max_norm_ratio``: a delta whose L2 norm exceeds this multiple of the model's own norm is
    refused as absurd. ``max_local_steps``: a delta claiming more local steps is refused.
    ``max_deltas_per_minute`` and ``delta_burst``: each client's token bucket (0 per minute: no
    limit); an honest client sends one delta per round, so if honest ones see ``rate_limited``
    (rounds of a second or two, as in tests), raise the rate.
    """

    max_staleness: int = 0
    max_norm_ratio: float = 1.0
    max_local_steps: int = 1_000_000
    max_deltas_per_minute: float = RATE_DELTAS_PER_MINUTE
    delta_burst: int = RATE_BURST_DELTAS
    limits: DeltaLimits = DeltaLimits()

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.max_norm_ratio <= 0:
            raise ConfigError("max_staleness must be >= 0 and max_norm_ratio > 0")
        if self.max_deltas_per_minute < 0 or self.delta_burst < 1:
            raise ConfigError("--max-deltas-per-minute must be >= 0 (0: no limit) and the burst >= 1")


# Moves θ by one admitted delta: (delta, arrival, ids of the active clients, sender included) → None,
# or refuses it (the guard, coordinator.guard): → (reason, detail), θ untouched.
ApplyDelta = Callable[[dict[str, torch.Tensor], Arrival, set[str]], tuple[str, str] | None]
# Versions whose applied-delta count is kept, to count a base's staleness in arrivals: far beyond
# any sane staleness bound.
VERSIONS_KEPT = 1024
# Elements per float32 reduction in sum_of_squares: a 4 MiB temporary, and the chunks' sums added
# in float64; measured relative error ~3e-8 against a float64 sum, for 5M and 50M elements.
SQUARES_CHUNK = 1 << 20
# A delta whose fast |g| lies within this relative distance of the norm bound is judged again with
# float64 sums (the check of old): the fast sums' error is thousands of times smaller, so every
# verdict is the one the float64 sums give.
NORM_RECHECK_MARGIN = 1e-3
# Below this, a fast Σx² may have lost a real share of itself to float32 squares that underflow
# (each at most 1.2e-38; a delta holds fewer than 1e10 elements): judged with float64 sums.
TINY_SUM_OF_SQUARES = 1e-20


def sum_of_squares(tensors: Iterable[torch.Tensor]) -> float:
    """Σx² over every element of ``tensors`` in one float32 pass per chunk (the fast check).

    A NaN or an Inf anywhere makes the result non-finite, so a finite result proves every value
    finite; a non-finite one may also come from finite values beyond ~1.8e19, whose float32
    squares overflow: :func:`exact_sum_of_squares` tells the two apart.
    """
    total = 0.0
    for tensor in tensors:
        for chunk in tensor.reshape(-1).split(SQUARES_CHUNK):
            total += float(chunk.square().sum())
    return total


def exact_sum_of_squares(tensors: Iterable[torch.Tensor]) -> float:
    """Σx² in float64 (finite for any finite float32 values): the reference the fast check defers to."""
    return sum(float(t.double().pow(2).sum()) for t in tensors)


class DeltaIntake:
    """Checks deltas against the coordinator's own manifest and feeds good ones to ``apply``."""

    def __init__(
        self,
        *,
        config: IntakeConfig,
        params: dict[str, torch.Tensor],
        registry: ClientRegistry,
        progress: RunProgress,
        rules: Sequence[AdmissionRule],
        apply: ApplyDelta,
        run_id: str,
        senders: SenderCheck | None = None,
    ) -> None:
        self.config = config
        self.params = params  # θ, read only: names, shapes and the model's norm
        self.registry = registry
        self.progress = progress
        self.rules = list(rules)
        self.senders: SenderCheck = senders or OpenSenders()
        self.apply = apply
        self.run_id = run_id
        self.version = 0  # the newest committed snapshot version (bases are judged against it)
        # version -> deltas applied when it was taken: a base's staleness in arrivals
        self.applied_at: dict[int, int] = {0: 0}
        self.numels = {name: p.numel() for name, p in params.items()}
        self.max_delta_bytes = delta_bytes_bound(self.numels)  # what this model's deltas encode to, at most
        # Σθ² for the norm check, with the tensors it was taken of (kept alive, so that their ids
        # stay theirs) and their in-place version counters then: see _model_sq.
        self._theta_sq: tuple[list[torch.Tensor], list[int], float] | None = None
        self.counts: Counter[str] = Counter()  # by OutcomeKind value: applied, duplicate, rejected
        self.rejected_by_reason: Counter[str] = Counter()
        self.verdicts = VerdictBoard(run_id)  # each client's newest verdict, for the publisher to write

    def handle(self, body: bytes, *, sender: str = "", now: float | None = None,
               parts_of: tuple[str, int] | None = None) -> Outcome:
        """Process one delta body sent by broker user ``sender``; never raises for bad input.

        ``parts_of``: the body was put together from the parts of delta (client id, seq), whose
        sender was checked part by part; the delta must then be exactly that one.
        """
        now = time.time() if now is None else now
        limits = self.config.limits.assembled() if parts_of else self.config.limits
        try:
            outcome = self._handle(body, now, limits, sender, parts_of)
        except ProtocolError as exc:
            outcome = Outcome.rejected(exc.reason, exc.detail)
        self.count(outcome)
        return outcome

    def take_version(self, version: int) -> None:
        """Judge bases against ``version`` from now on; it holds every delta applied so far."""
        self.version = version
        self._theta_sq = None  # Σθ² is taken afresh at least once per version (see _model_sq)
        self.applied_at.setdefault(version, self.counts[OutcomeKind.APPLIED.value])
        if len(self.applied_at) > VERSIONS_KEPT:
            for old in sorted(self.applied_at)[:-VERSIONS_KEPT]:
                del self.applied_at[old]

    def staleness_of(self, base_version: int) -> int:
        """Deltas applied since ``base_version`` was taken. For a version no longer (or, after a
        resume from an older checkpoint, not yet) remembered: since the oldest one after it,
        which undercounts only where nothing is known."""
        applied = self.counts[OutcomeKind.APPLIED.value]
        at = self.applied_at.get(base_version)
        if at is None:
            later = [v for v in self.applied_at if v > base_version]
            at = self.applied_at[min(later)] if later else applied
        return applied - at

    def count(self, outcome: Outcome) -> None:
        """Count an outcome; a rejection of a known client's delta is remembered as settled; the
        client's verdict (applied, or rejected and why) waits to be published."""
        self.counts[outcome.kind.value] += 1
        self.verdicts.record(outcome, time.time())
        if outcome.kind is not OutcomeKind.REJECTED:
            return
        self.rejected_by_reason[outcome.reason] += 1
        record = self.registry.clients.get(outcome.client_id)
        if record is not None:
            record.rejected += 1
            if outcome.reason not in _NOT_SETTLED:
                # Settled for good: a redelivery (after a crash between checkpoint and ack) is then
                # a duplicate, not judged a second time (a base judged "future" before a restart
                # could otherwise pass after it). Only for known clients, so a flood of made-up
                # client ids grows nothing.
                record.remember(outcome.seq)
        log.warning("rejected delta %s: %s (%s)", outcome.delta_id or "?", outcome.reason, outcome.detail)

    def screen(self, run_id: str, client_id: str, seq: int, *, sender: str | None,
               now: float) -> Outcome | None:
        """The checks that need only a delta's identity: its run, a usable client id, a sender
        allowed to send as that client, not settled already. None if it passes; used for whole
        deltas and for each part of a big one."""
        if run_id != self.run_id:
            return Outcome.rejected("wrong_run", f"delta for run {run_id!r}, this run is {self.run_id!r}",
                                    client_id, seq)
        if not _CLIENT_ID.match(client_id):
            return Outcome.rejected("bad_client_id", "client id must be 1-64 of [A-Za-z0-9_.-]",
                                    client_id, seq)
        refused = self.senders.refuse(sender, client_id, now) if sender is not None else None
        if refused is not None:
            return Outcome.rejected(*refused, client_id, seq)
        record = self.registry.clients.get(client_id)
        if record is not None and record.seen(seq):
            return Outcome(OutcomeKind.DUPLICATE, "duplicate", "already applied or rejected", client_id, seq)
        if record is not None and record.too_old(seq):
            return Outcome.rejected("replayed", f"seq {seq} is older than every remembered one",
                                    client_id, seq)
        if record is not None and record.max_seq >= 0 and seq > record.max_seq + MAX_SEQ_JUMP:
            return Outcome.rejected("seq_jump", f"seq {seq} is far past this client's newest "
                                    f"({record.max_seq})", client_id, seq)
        return None

    def save_state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "rejected_by_reason": dict(self.rejected_by_reason),
                "applied_at": {str(v): n for v, n in self.applied_at.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.counts = Counter(state.get("counts") or {})
        self.rejected_by_reason = Counter(state.get("rejected_by_reason") or {})
        # A checkpoint from before staleness counted arrivals has none: bases older than the
        # resumed version then count from it (see staleness_of).
        self.applied_at = {int(v): int(n) for v, n in (state.get("applied_at") or {}).items()}

    def _handle(self, body: bytes, now: float, limits: DeltaLimits, sender: str,
                parts_of: tuple[str, int] | None) -> Outcome:
        msg = DeltaMessage.decode(body, limits)
        cid, seq = msg.client_id, msg.seq
        if parts_of is not None and (cid, seq) != parts_of:
            return Outcome.rejected("part_mismatch", f"parts of {parts_of[0]}:{parts_of[1]} hold delta "
                                    f"{cid[:64]}:{seq}", *parts_of)
        # The parts of an assembled delta were each checked against their sender on arrival.
        screened = self.screen(msg.run_id, cid, seq, sender=None if parts_of else sender, now=now)
        if screened is not None:
            return screened
        if msg.base_version > self.version:
            return Outcome.rejected("future_version", f"base {msg.base_version} > current {self.version}",
                                    cid, seq)
        active_ids = {c.client_id for c in self.registry.active(now)} | {cid}  # sender is active now
        arrival = Arrival(client_id=cid, seq=seq, base_version=msg.base_version,
                          staleness=self.staleness_of(msg.base_version), local_steps=msg.local_steps,
                          now=now, from_parts=parts_of is not None, active_clients=len(active_ids),
                          stacked_on=msg.stacked_on, origin_version=msg.origin_version)

        def reject(reason: str, detail: str) -> Outcome:
            return Outcome.rejected(reason, detail, cid, seq, arrival.staleness)

        for rule in self.rules:
            refused = rule.refuse(arrival)
            if refused is not None:
                return reject(*refused)
        try:
            codec = get_codec(msg.codec)
        except ProtocolError as exc:  # counted against the sender, like every check below
            return reject(exc.reason, exc.detail)
        if set(msg.tensors) != set(self.numels):
            missing = sorted(set(self.numels) - set(msg.tensors))[:3]
            extra = sorted(set(msg.tensors) - set(self.numels))[:3]
            return reject("wrong_names", f"missing {missing}, unexpected {extra}")
        delta = {}
        for name, blob in msg.tensors.items():
            try:
                flat = codec.decode(blob, self.numels[name])
            except ProtocolError as exc:  # "wrong_size": not exactly the manifest's element count
                return reject(exc.reason, f"tensor {name!r}: {exc.detail}")
            delta[name] = flat.view_as(self.params[name])
        try:
            sq, model_norm = self._check_values(delta)
        except ProtocolError as exc:  # "non_finite", "norm_too_large"
            return reject(exc.reason, exc.detail)
        log.debug("apply %s:%d base=%d staleness=%d steps=%d |g|=%.4f |θ|=%.2f N=%d", cid, seq,
                  msg.base_version, arrival.staleness, msg.local_steps, math.sqrt(sq), model_norm,
                  len(active_ids))
        refused = self.apply(delta, arrival, active_ids)
        if refused is not None:
            return reject(*refused)
        for rule in self.rules:
            rule.admitted(arrival)
        # Credited no more steps than it was assigned (the slack lets a little more in, uncounted).
        steps, tokens, samples = self.registry.credit(cid, arrival.began_on, local_steps=msg.local_steps,
                                                      tokens=msg.tokens, samples=msg.samples)
        self.registry.record_applied(
            client_id=cid, seq=seq, base_version=msg.base_version, local_steps=steps,
            compute_s=msg.compute_s, tokens=tokens, train_loss=msg.train_loss,
            staleness=arrival.staleness, now=now, device=msg.device, timings=msg.previous_timings,
            origin_version=msg.origin_version,
        )
        self.progress.add(local_steps=steps, tokens=tokens, samples=samples)
        return Outcome(OutcomeKind.APPLIED, "", "", cid, seq, arrival.staleness)

    def _check_values(self, delta: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Σg² of a delta and the model's norm |θ|; raise :class:`ProtocolError` ``non_finite`` (a
        NaN or an Inf in it) or ``norm_too_large`` (|g| above ``max_norm_ratio`` × |θ|).

        One float32 pass over the delta (:func:`sum_of_squares`, whose finite result proves every
        value finite) and |θ| remembered while θ is unchanged (:meth:`_model_sq`). The float64
        sums decide wherever the fast ones could differ from them: a non-finite fast sum (NaN or
        Inf, or finite values whose squares overflow float32), a |g| within
        ``NORM_RECHECK_MARGIN`` of the bound, a sum so small that float32 squares underflow in it.
        """
        sq = sum_of_squares(delta.values())
        if not math.isfinite(sq):
            if not all(bool(torch.isfinite(t).all()) for t in delta.values()):
                raise ProtocolError("non_finite", "NaN or Inf in the delta")
            sq = exact_sum_of_squares(delta.values())  # huge but finite: float64 holds their squares
        theta_sq = self._model_sq()
        bound = self.config.max_norm_ratio * math.sqrt(theta_sq)
        if (not math.isfinite(bound) or min(sq, theta_sq) < TINY_SUM_OF_SQUARES
                or abs(math.sqrt(sq) - bound) <= NORM_RECHECK_MARGIN * bound):
            sq = exact_sum_of_squares(delta.values())
            theta_sq = exact_sum_of_squares(self.params.values())
            bound = self.config.max_norm_ratio * math.sqrt(theta_sq)
        if math.sqrt(sq) > bound:
            raise ProtocolError("norm_too_large", f"|g| = {math.sqrt(sq):.3g} > {bound:.3g}")
        return sq, math.sqrt(theta_sq)

    def _model_sq(self) -> float:
        """Σθ² by :func:`sum_of_squares`, taken again only when θ changed: every in-place change
        (an applied delta, a sync round's step, the warm start's adoption) moves its tensor's
        version counter, a restore puts other tensors in, and each new version starts afresh."""
        tensors = list(self.params.values())
        versions = [t._version for t in tensors]
        cached = self._theta_sq
        if (cached is None or cached[1] != versions or len(cached[0]) != len(tensors)
                or any(a is not b for a, b in zip(cached[0], tensors, strict=True))):
            cached = self._theta_sq = (tensors, versions, sum_of_squares(tensors))
        return cached[2]
