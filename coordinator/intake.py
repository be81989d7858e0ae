"""The delta handler: decode, check, de-duplicate and apply one delta; return its outcome.

It knows nothing of AMQP: the consumer turns outcomes into acks (applied, duplicate) or dead
letters (rejected). Checks, in order, each with its own counted reason: the message decodes within
limits (:mod:`shared.protocol` names those reasons); right run; a client id we can name; not a
replay; base version neither in the future nor beyond the staleness bound (during a warm start:
from its holder and on the current version, see :mod:`coordinator.warm_start`); a known codec; exactly
the model's parameter names; payloads of exactly the right size; finite values; a norm that is not
absurd next to the model's own.

Whether a delta that passed those checks may touch the model *now* is up to the admission rules
(:mod:`coordinator.admission`: the sync round's barrier, the warm start, the staleness and
local-steps bounds), asked in order; how it then moves θ is the ``apply`` callable the run state
hands in (the outer optimizer's step, or the warm start's adoption).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.admission import AdmissionRule, Arrival
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry
from shared.codecs import get_codec
from shared.errors import ConfigError, ProtocolError
from shared.protocol import DeltaLimits, DeltaMessage

log = logging.getLogger(__name__)

# Rejections that say nothing about the sender's own sequence (another run, a name we cannot use,
# a seq we cannot judge): not remembered as settled.
_NOT_SETTLED = frozenset({"wrong_run", "bad_client_id", "replayed"})
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class IntakeConfig:
    """Which deltas are accepted.

    ``max_staleness``: a delta whose base is more than this many versions behind is discarded; if
    slow volunteers see many ``stale`` rejections, raise it (or lower the plan's local steps).
    ``max_norm_ratio``: a delta whose L2 norm exceeds this multiple of the model's own norm is
    refused as absurd. ``max_local_steps``: a delta claiming more local steps is refused.
    """

    max_staleness: int = 32
    max_norm_ratio: float = 1.0
    max_local_steps: int = 1_000_000
    limits: DeltaLimits = DeltaLimits()

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.max_norm_ratio <= 0:
            raise ConfigError("max_staleness must be >= 0 and max_norm_ratio > 0")


# Moves θ by one admitted delta: (delta, arrival, active clients) → None.
ApplyDelta = Callable[[dict[str, torch.Tensor], Arrival, int], None]


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
    ) -> None:
        self.config = config
        self.params = params  # θ, read only: names, shapes and the model's norm
        self.registry = registry
        self.progress = progress
        self.rules = list(rules)
        self.apply = apply
        self.run_id = run_id
        self.version = 0  # the newest committed snapshot version (bases are judged against it)
        self.numels = {name: p.numel() for name, p in params.items()}
        self.counts: Counter[str] = Counter()  # by OutcomeKind value: applied, duplicate, rejected
        self.rejected_by_reason: Counter[str] = Counter()

    def handle(self, body: bytes, *, now: float | None = None, assembled: bool = False) -> Outcome:
        """Process one delta body (``assembled``: put together from parts); never raises for bad input."""
        now = time.time() if now is None else now
        limits = self.config.limits.assembled() if assembled else self.config.limits
        try:
            outcome = self._handle(body, now, limits)
        except ProtocolError as exc:
            outcome = Outcome.rejected(exc.reason, exc.detail)
        self.count(outcome)
        return outcome

    def count(self, outcome: Outcome) -> None:
        """Count an outcome; a rejection of a known client's delta is remembered as settled."""
        self.counts[outcome.kind.value] += 1
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

    def screen(self, run_id: str, client_id: str, seq: int) -> Outcome | None:
        """The checks that need only a delta's identity: its run, a usable client id, not settled
        already. None if it passes; used for whole deltas and for each part of a big one."""
        if run_id != self.run_id:
            return Outcome.rejected("wrong_run", f"delta for run {run_id!r}, this run is {self.run_id!r}",
                                    client_id, seq)
        if not _CLIENT_ID.match(client_id):
            return Outcome.rejected("bad_client_id", "client id must be 1-64 of [A-Za-z0-9_.-]",
                                    client_id, seq)
        record = self.registry.clients.get(client_id)
        if record is not None and record.seen(seq):
            return Outcome(OutcomeKind.DUPLICATE, "duplicate", "already applied or rejected", client_id, seq)
        if record is not None and record.too_old(seq):
            return Outcome.rejected("replayed", f"seq {seq} is older than every remembered one",
                                    client_id, seq)
        return None

    def save_state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "rejected_by_reason": dict(self.rejected_by_reason)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.counts = Counter(state.get("counts") or {})
        self.rejected_by_reason = Counter(state.get("rejected_by_reason") or {})

    def _handle(self, body: bytes, now: float, limits: DeltaLimits) -> Outcome:
        msg = DeltaMessage.decode(body, limits)
        cid, seq = msg.client_id, msg.seq
        screened = self.screen(msg.run_id, cid, seq)
        if screened is not None:
            return screened
        if msg.base_version > self.version:
            return Outcome.rejected("future_version", f"base {msg.base_version} > current {self.version}",
                                    cid, seq)
        arrival = Arrival(client_id=cid, seq=seq, base_version=msg.base_version,
                          staleness=self.version - msg.base_version, local_steps=msg.local_steps, now=now)

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
        sq = sum(float(t.double().pow(2).sum()) for t in delta.values())
        if not math.isfinite(sq) or not all(bool(torch.isfinite(t).all()) for t in delta.values()):
            return reject("non_finite", "NaN or Inf in the delta")
        model_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in self.params.values()))
        if math.sqrt(sq) > self.config.max_norm_ratio * model_norm:
            bound = self.config.max_norm_ratio * model_norm
            return reject("norm_too_large", f"|g| = {math.sqrt(sq):.3g} > {bound:.3g}")
        active_ids = {c.client_id for c in self.registry.active(now)} | {cid}  # sender is active now
        log.debug("apply %s:%d base=%d staleness=%d steps=%d |g|=%.4f |θ|=%.2f N=%d", cid, seq,
                  msg.base_version, arrival.staleness, msg.local_steps, math.sqrt(sq), model_norm,
                  len(active_ids))
        self.apply(delta, arrival, len(active_ids))
        for rule in self.rules:
            rule.admitted(arrival)
        self.registry.record_applied(
            client_id=cid, seq=seq, local_steps=msg.local_steps, compute_s=msg.compute_s,
            tokens=msg.tokens, train_loss=msg.train_loss, staleness=arrival.staleness, now=now,
        )
        self.progress.add(local_steps=msg.local_steps, tokens=msg.tokens, samples=msg.samples)
        return Outcome(OutcomeKind.APPLIED, "", "", cid, seq, arrival.staleness)
