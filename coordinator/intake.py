"""The delta handler: decode, check, de-duplicate and apply one delta; return its outcome.

It knows nothing of AMQP: the consumer turns outcomes into acks (applied, duplicate) or dead
letters (rejected). Checks, in order, each with its own counted reason: the message decodes within
limits (:mod:`shared.protocol` names those reasons); right run; a client id we can name; not a
replay; base version neither in the future nor beyond the staleness bound (during a warm start:
from its holder and on the current version, see :mod:`coordinator.warm_start`); a known codec; exactly
the model's parameter names; payloads of exactly the right size; finite values; a norm that is not
absurd next to the model's own.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass

import torch

from coordinator.outer_optimizer import OuterOptimizer
from coordinator.registry import ClientRegistry
from coordinator.sync_round import SyncBarrier
from coordinator.warm_start import WarmStart
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
    refused as absurd.
    """

    max_staleness: int = 32
    max_norm_ratio: float = 1.0
    max_local_steps: int = 1_000_000
    limits: DeltaLimits = DeltaLimits()

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.max_norm_ratio <= 0:
            raise ConfigError("max_staleness must be >= 0 and max_norm_ratio > 0")


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery: ``applied``, ``duplicate`` or ``rejected`` (with reason)."""

    kind: str
    reason: str = ""
    detail: str = ""
    client_id: str = ""
    seq: int = -1
    staleness: int = 0

    @property
    def delta_id(self) -> str:
        return f"{self.client_id}:{self.seq}" if self.client_id else ""


class DeltaIntake:
    """Checks deltas against the coordinator's own manifest and feeds good ones to the optimizer."""

    def __init__(
        self,
        *,
        config: IntakeConfig,
        optimizer: OuterOptimizer,
        registry: ClientRegistry,
        run_id: str,
        barrier: SyncBarrier | None = None,
        warm: WarmStart | None = None,
    ) -> None:
        self.config = config
        self.warm = warm  # warm start: single-worker training until its step count
        self.barrier = barrier  # synchronous DiLoCo: deltas must join the current round
        self.optimizer = optimizer
        self.registry = registry
        self.run_id = run_id
        self.version = 0  # the newest committed snapshot version (bases are judged against it)
        self.numels = {name: p.numel() for name, p in optimizer.params.items()}
        self.counts: Counter[str] = Counter()  # applied, duplicate, rejected
        self.rejected_by_reason: Counter[str] = Counter()
        self.progress = {"local_steps": 0, "tokens": 0, "samples": 0}

    @property
    def warming_up(self) -> bool:
        return self.warm is not None and self.warm.active(self.progress["local_steps"])

    def handle(self, body: bytes, *, now: float | None = None, assembled: bool = False) -> Outcome:
        """Process one delta body (``assembled``: put together from parts); never raises for bad input."""
        now = time.time() if now is None else now
        limits = self.config.limits.assembled() if assembled else self.config.limits
        try:
            outcome = self._handle(body, now, limits)
        except ProtocolError as exc:
            outcome = Outcome("rejected", exc.reason, exc.detail)
        self.count(outcome)
        return outcome

    def count(self, outcome: Outcome) -> None:
        """Count an outcome; a rejection of a known client's delta is remembered as settled."""
        self.counts[outcome.kind] += 1
        if outcome.kind != "rejected":
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
            return Outcome("rejected", "wrong_run", f"delta for run {run_id!r}, this run is {self.run_id!r}",
                           client_id, seq)
        if not _CLIENT_ID.match(client_id):
            return Outcome("rejected", "bad_client_id", "client id must be 1-64 of [A-Za-z0-9_.-]",
                           client_id, seq)
        record = self.registry.clients.get(client_id)
        if record is not None and record.seen(seq):
            return Outcome("duplicate", "duplicate", "already applied or rejected", client_id, seq)
        if record is not None and record.too_old(seq):
            return Outcome("rejected", "replayed", f"seq {seq} is older than every remembered one",
                           client_id, seq)
        return None

    def _handle(self, body: bytes, now: float, limits: DeltaLimits) -> Outcome:
        msg = DeltaMessage.decode(body, limits)
        cid, seq = msg.client_id, msg.seq

        def reject(reason: str, detail: str, staleness: int = 0) -> Outcome:
            return Outcome("rejected", reason, detail, cid, seq, staleness)

        screened = self.screen(msg.run_id, cid, seq)
        if screened is not None:
            return screened
        if msg.base_version > self.version:
            return reject("future_version", f"base {msg.base_version} > current {self.version}")
        staleness = self.version - msg.base_version
        if self.barrier is not None:
            # A client whose delta came too late still belongs to the next rounds: they wait for it.
            self.registry.get(cid).last_contact = now
            refused = self.barrier.refuse(cid, msg.base_version)
            if refused is not None:
                return reject(*refused, staleness)
        warming = self.warming_up
        if warming:
            assert self.warm is not None
            refused = self.warm.refuse(cid, staleness, now)
            if refused is not None:
                return reject(*refused, staleness)
        if staleness > self.config.max_staleness:
            return reject("stale", f"{staleness} versions behind (bound {self.config.max_staleness})",
                          staleness)
        if not 1 <= msg.local_steps <= self.config.max_local_steps:
            return reject("bad_steps", f"local_steps {msg.local_steps} out of range")
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
            delta[name] = flat.view_as(self.optimizer.params[name])
        sq = sum(float(t.double().pow(2).sum()) for t in delta.values())
        if not math.isfinite(sq) or not all(bool(torch.isfinite(t).all()) for t in delta.values()):
            return reject("non_finite", "NaN or Inf in the delta")
        model_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in self.optimizer.params.values()))
        if math.sqrt(sq) > self.config.max_norm_ratio * model_norm:
            bound = self.config.max_norm_ratio * model_norm
            return reject("norm_too_large", f"|g| = {math.sqrt(sq):.3g} > {bound:.3g}")
        active_ids = {c.client_id for c in self.registry.active(now)} | {cid}  # sender is active now
        log.debug("apply %s:%d base=%d staleness=%d steps=%d |g|=%.4f |θ|=%.2f N=%d", cid, seq,
                  msg.base_version, staleness, msg.local_steps, math.sqrt(sq), model_norm, len(active_ids))
        if warming:
            assert self.warm is not None
            self.optimizer.adopt(delta)
            self.warm.took(cid, now)
        else:
            self.optimizer.step(delta, active_clients=len(active_ids), staleness=staleness)
        if self.barrier is not None:
            self.barrier.add(cid, now)
        self.registry.record_applied(
            client_id=cid, seq=seq, local_steps=msg.local_steps, compute_s=msg.compute_s,
            tokens=msg.tokens, train_loss=msg.train_loss, staleness=staleness, now=now,
        )
        self.progress["local_steps"] += msg.local_steps
        self.progress["tokens"] += msg.tokens
        self.progress["samples"] += msg.samples
        return Outcome("applied", "", "", cid, seq, staleness)
