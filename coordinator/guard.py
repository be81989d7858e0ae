"""The delta guard: bounded damage from a volunteer that lies, before its delta touches θ.

The intake's own checks (:mod:`coordinator.intake`) refuse what is malformed or absurd: names,
sizes, NaN, a norm above the model's own. Delayed Nesterov still moves θ on every arrival, so a
delta that is well-formed but hostile (scaled up, sign-flipped, noise, a boosted backdoor) would
move the model by up to ε/N of its whole norm, every round. Robust aggregators that vote over a
synchronous cohort (Krum, trimmed mean: more than 2f + 2 updates at once) do not fit an asynchronous
buffer of four, so the guard judges each arrival on its own against robust statistics of the
deltas it accepted recently, and the server's own momentum:

1. **Screening** (any mode but ``off``): a delta whose L2 norm is beyond ``reject_ratio`` times the
   median norm of the last ``window`` accepted deltas is refused (``norm_outlier``), and so is one
   in which a single tensor holds more than ``reject_ratio`` times its median share of the norm
   (``tensor_outlier``: an attack on one small layer hides in the whole norm). A delta pointing
   against the senders' reference (:mod:`coordinator.reference`: the accepted deltas' directions,
   one share per recent sender, so that the fastest volunteer cannot turn it), or against the
   server's momentum before three named senders voted, is refused as ``against_momentum``
   (:mod:`coordinator.direction`: with an honest sender's rare dip forgiven; with ``distrust``,
   a sender that mostly pointed against it must reach the median cosine, or pass a trial on the
   operator's data, ``DescentCheck.strict``, as must a run's first deltas, before there is a
   direction, and those the momentum's valve would let in).
2. **Centered clipping** (mode ``clip``, the default): ``g' = c + clip(g − c, τ)`` around the
   centre ``c = (1 − β)·m`` (the server momentum's running mean of deltas), with τ =
   ``clip_ratio`` times the median distance |g − c| of recent accepted deltas. A delta then moves
   θ by at most ε(τ + |c|)/N, whatever it holds; the cost is O(d) per arrival.

3. **Descent check** (optional, ``descent_every`` > 0): every so many deltas that pass are tried
   on a batch of the operator's own data (:mod:`coordinator.descent`); one that raises its loss
   is refused (``no_descent``).
4. **Probation** (any mode but ``off``; :mod:`coordinator.probation`): a sender with ``strikes``
   of its last ``record`` deltas refused for size or clipped has its deltas judged but not applied
   (``probation``) until fewer are.

The statistics hold only what was accepted (a clipped delta counts at its clipped size), so an
attacker cannot inflate them with its own rejected deltas; a minority of attackers cannot move a
median. Until ``min_history`` deltas were accepted there is no statistic and only the intake's
absolute bounds hold, unless trusted deltas began the statistics (the coordinator's own seed
round, :mod:`coordinator.seed_round`, on by default; a warm start from a trusted holder): from
the first one they are the statistic, and their running mean the direction judged by until the
momentum has one (checkpointed while it is). Every decision is counted by reason (``status``,
``/metrics``).

If honest volunteers see ``norm_outlier`` or ``tensor_outlier`` rejections (rounds of very
different lengths: a full round's delta is several times a short one's), raise ``reject_ratio``;
if many honest deltas are clipped (``status`` shows ``clipped``), raise ``clip_ratio``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from coordinator.direction import DAMP, DAMPED_WEIGHT, REFUSE, TRY, DirectionCheck, cosine_to
from coordinator.outer_optimizer import Scaled
from coordinator.probation import Probation
from coordinator.reference import Reference
from shared.errors import ConfigError

log = logging.getLogger(__name__)

# Centre tensors (the server's running mean of deltas) for the arriving delta; None: no centre yet.
Centre = Callable[[], Mapping[str, torch.Tensor] | None]
# Why a delta (as it would be applied) fails the descent check, or None (coordinator.descent).
Descent = Callable[[Mapping[str, torch.Tensor]], str | None]


class GuardMode(str, Enum):
    OFF = "off"  # only the intake's absolute checks
    SCREEN = "screen"  # refuse outliers, apply the rest as sent
    CLIP = "clip"  # refuse outliers, clip the rest around the server's momentum

    @property
    def screens(self) -> bool:
        return self is not GuardMode.OFF


GUARD_MODES = tuple(m.value for m in GuardMode)
TRUSTED_PREFIX = "guard_trusted/"  # the trusted mean's tensors in a checkpoint
TRUSTED_VOTER = "(warm start)"  # the trusted holder, as it votes in the reference
# Weight of the newest trusted delta in their running mean (about the last 1/w rounds).
TRUSTED_MEAN_WEIGHT = 0.3
# Reasons the guard refuses a delta for (each counted in ``rejected_by_reason``).
GUARD_REASONS = ("norm_outlier", "tensor_outlier", "against_momentum", "no_descent", "probation")


@dataclass(frozen=True)
class GuardConfig:
    """How the guard judges deltas (module docstring). The defaults are the measured ones
    (docs/SECURITY.md, "Poisoned updates")."""

    mode: str = GuardMode.CLIP.value
    reject_ratio: float = 4.0
    clip_ratio: float = 3.0
    min_cosine: float = 0.0
    # a sender whose last so many deltas all pointed along the momentum has one that points
    # against it forgiven (honest rounds dip a little below 0 late in a run; 0: never)
    forgive_after: int = 4
    # pointing against the momentum: below min(min_cosine, median − spread × σ of the recent
    # accepted cosines) (coordinator/direction.py; 0: below min_cosine)
    direction_spread: float = 2.0
    # judged by the senders' reference, a sender that mostly pointed against it must reach the
    # median accepted cosine, or lower the loss on the operator's data (coordinator/direction.py);
    # a run's first deltas and those the momentum's valve would let in must lower it too (on by
    # default: in real 4-client runs it refused no honest delta, docs/SECURITY.md)
    distrust: bool = True
    # at a fresh start, the coordinator trains one round itself and the guard learns from it as
    # from a trusted warm start's (coordinator.seed_round): it never starts blind
    seed_round: bool = True
    window: int = 64
    min_history: int = 3
    strikes: int = 3  # refused or clipped judgements in a sender's record that put it on probation (0: never)
    record: int = 8  # judgements kept per sender
    descent_every: int = 0  # check every so many passing deltas on trusted data (0: never)
    descent_tolerance: float = 0.005  # the rise of the trusted loss, relative, that refuses

    def __post_init__(self) -> None:
        if self.mode not in GUARD_MODES:
            raise ConfigError(f"unknown guard mode {self.mode!r} (known: {', '.join(GUARD_MODES)})")
        if not self.reject_ratio > 1 or not self.clip_ratio > 0:
            raise ConfigError("the guard's reject ratio must be > 1 and its clip ratio > 0")
        if not -1 <= self.min_cosine <= 1:
            raise ConfigError("the guard's minimum cosine must be in [-1, 1]")
        if not 0 <= self.forgive_after <= self.window:
            raise ConfigError("the guard's forgive-after must be in [0, window]")
        if not 0 <= self.direction_spread <= 10:
            raise ConfigError("the guard's direction spread must be in [0, 10]")
        if self.window < 3 or not 1 <= self.min_history <= self.window:
            raise ConfigError("the guard's window must be >= 3 and its history in [1, window]")
        if self.record < 1 or not 0 <= self.strikes <= self.record:
            raise ConfigError("the guard's record must be >= 1 and its strikes in [0, record]")
        if self.descent_every < 0 or not self.descent_tolerance >= 0:
            raise ConfigError("the guard's descent check needs every >= 0 and a tolerance >= 0")

    @property
    def guard_mode(self) -> GuardMode:
        return GuardMode(self.mode)


@dataclass(frozen=True)
class GuardDecision:
    """What the guard made of a delta: refused (``reason`` says why), or the delta to apply
    (clipped when ``clipped``; scaled as it is read when ``damped``)."""

    delta: Mapping[str, torch.Tensor] | None
    reason: str = ""
    detail: str = ""
    clipped: bool = False
    damped: bool = False  # applied at DAMPED_WEIGHT: a little against the senders' reference

    @property
    def refused(self) -> bool:
        return self.delta is None


@dataclass(frozen=True)
class Screening:
    """The screen's word on a delta: its refusal (None: it passed); its cosine to what the
    direction is judged by (None where it was not looked at, or there was nothing to judge by);
    whether the direction check damps it."""

    refused: GuardDecision | None = None
    cosine: float | None = None
    damped: bool = False
    # a delta the direction cannot vouch for: in only if the trial on the operator's data
    # passes, else this refusal
    tried: GuardDecision | None = None


class DeltaGuard:
    """Screens and clips arriving deltas against the recent accepted ones (module docstring)."""

    def __init__(self, config: GuardConfig, names: list[str], *, centre: Centre | None = None,
                 full_steps: int = 1, descent: Descent | None = None, trial: Descent | None = None) -> None:
        self.config = config
        self.centre: Centre = centre or (lambda: None)  # see momentum_centre
        # the descent check, where the operator's data is at hand and config.descent_every > 0
        self.descent = descent if config.descent_every else None
        # with distrust, the strict descent check that a delta the direction check cannot vouch
        # for must pass (DescentCheck.strict; None: a distrusted sender's such delta is refused)
        self.trial = trial if config.distrust else None
        self.passed_since_descent = 0
        self.full_steps = max(1, full_steps)  # H, a full round's local steps
        self.mode = config.guard_mode
        self.names = list(names)
        self.norms: deque[float] = deque(maxlen=config.window)  # accepted deltas' L2 norms
        # each tensor's share of an accepted delta's norm, |g_t| / |g|: free of the delta's size
        self.tensor_shares = {n: deque[float](maxlen=config.window) for n in self.names}
        self.distances: deque[float] = deque(maxlen=config.window)  # accepted |g − c|, clipped at τ
        # the running mean of trusted deltas (a warm start's): the centre until the momentum has one
        self.trusted: dict[str, torch.Tensor] | None = None
        # whether the statistics began with trusted deltas (kept across a restart, unlike the mean)
        self.trusted_start = False
        self.counts: Counter[str] = Counter()  # judged, accepted, clipped, and each refusal reason
        self.direction = DirectionCheck(config.min_cosine, config.forgive_after, self.counts,
                                        spread=config.direction_spread, window=config.window,
                                        distrust=config.distrust, tries=self.trial is not None)
        # what the direction check judges by once senders voted: one share each (coordinator.reference)
        self.reference = Reference()
        self.probation = Probation(config.strikes, config.record)  # per sender, its last judgements

    def judge(self, delta: dict[str, torch.Tensor], *, local_steps: int | None = None,
              sender: str = "") -> GuardDecision:
        """Refuse, clip or pass ``delta`` (already decoded and finite) of ``local_steps`` steps.

        A delta of H_i local steps (the steps it claims, at most its assignment) is judged as
        H/H_i times itself, the size of a full round's, so that a slow volunteer's short rounds
        and a fast one's full ones share one statistic. A sender that claims fewer steps than it
        ran only makes its delta look bigger. ``sender`` names who sent it (the direction check's
        safety valve counts distinct senders; probation keeps a record per sender).
        """
        if not self.mode.screens:
            return GuardDecision(delta)
        self.counts["judged"] += 1
        k = self.full_steps / max(1, min(local_steps or self.full_steps, self.full_steps))
        centre = self._centre()
        tensor_norms = {n: k * float(torch.linalg.vector_norm(g)) for n, g in delta.items()}
        norm = math.sqrt(sum(v * v for v in tensor_norms.values()))
        reference = self.reference.direction()
        self.direction.judge_by(reference is not None)
        against = "senders' reference" if reference else "server's momentum"
        screening = self._screen(delta, norm, tensor_norms, reference or centre, sender, scale=k,
                                 against=against)
        refused, cosine, damped = screening.refused, screening.cosine, screening.damped
        if refused is not None:
            return self._refuse(sender, refused)
        clipped = False
        distance = None
        if self.mode is GuardMode.CLIP:
            # |k·g − c|, around 0 (plain norm clipping) until the server has a momentum
            distance = (math.sqrt(sum(float(torch.linalg.vector_norm(g * k - centre[n])) ** 2
                                      for n, g in delta.items())) if centre is not None else norm)
            tau = self._tau()
            if tau is not None and distance > tau:
                shrink = tau / distance
                # k·g' = c + (k·g − c)·shrink, back in the delta's own size
                delta = ({n: (centre[n] + (g * k - centre[n]) * shrink) / k for n, g in delta.items()}
                         if centre is not None else {n: g * shrink for n, g in delta.items()})
                tensor_norms = {n: k * float(torch.linalg.vector_norm(g)) for n, g in delta.items()}
                norm = math.sqrt(sum(v * v for v in tensor_norms.values()))
                distance, clipped = tau, True
        # a little against the senders' reference: a quarter of its weight, scaled as it is read
        applied: Mapping[str, torch.Tensor] = Scaled(delta, DAMPED_WEIGHT) if damped else delta
        if screening.tried is not None:
            refused = self._try(applied, sender, screening.tried)
            if refused is not None:
                return refused
            why = None  # tried on trusted data already
        else:
            why = self._descent(applied)
        if why is not None:
            self.probation.strike(sender, True)
            self.counts["no_descent"] += 1
            return GuardDecision(None, "no_descent", why)
        on_probation = self.probation.strike(sender, clipped)
        if on_probation is not None:
            self.counts["probation"] += 1
            return GuardDecision(None, "probation", on_probation)
        if clipped:
            self.counts["clipped"] += 1
        self.counts["accepted"] += 1
        self._remember(norm, tensor_norms, distance)  # as sent (clipped), not as damped
        self.reference.vote(sender, delta, norm / k)  # its direction: damped or not, the same
        if cosine is not None:
            self.direction.accepted(cosine)
        detail = f"clipped to |g − c| = {distance:.3g}" if clipped else ""
        if damped:
            damping = (f"applied at {DAMPED_WEIGHT:g} of its weight: its cosine {cosine:.2f} to the "
                       f"{against} is below 0")
            detail = f"{detail}, {damping}" if detail else damping
        reason = "clipped" if clipped else "damped" if damped else ""
        return GuardDecision(applied, reason, detail, clipped, damped)

    def observe(self, delta: dict[str, torch.Tensor]) -> None:
        """Learn from a delta that is trusted, not judged (a warm start's, from its holder): a run
        that starts with one has statistics, and a direction to judge by, before the first
        stranger's delta (until the momentum has a direction of its own)."""
        if not self.mode.screens:
            return
        centre = self._centre()
        self.trusted_start = True
        if self.trusted is None:
            self.trusted = {n: g.detach().clone() for n, g in delta.items()}
        else:  # an exponential mean over the last few trusted rounds
            for name, g in delta.items():
                self.trusted[name].mul_(1 - TRUSTED_MEAN_WEIGHT).add_(g, alpha=TRUSTED_MEAN_WEIGHT)
        tensor_norms = {n: float(torch.linalg.vector_norm(g)) for n, g in delta.items()}
        norm = math.sqrt(sum(v * v for v in tensor_norms.values()))
        distance = (math.sqrt(sum(float(torch.linalg.vector_norm(g - centre[n])) ** 2
                                  for n, g in delta.items())) if centre is not None else norm)
        self._remember(norm, tensor_norms, distance if self.mode is GuardMode.CLIP else None)
        self.reference.vote(TRUSTED_VOTER, delta, norm)

    def _centre(self) -> Mapping[str, torch.Tensor] | None:
        centre = self.centre()
        if centre is not None:
            self.trusted = None  # the momentum has a direction of its own: a model's size freed
            return centre
        return self.trusted

    def tensors(self) -> dict[str, torch.Tensor]:
        """The running mean of trusted deltas, while it is the centre, and the senders' reference,
        for the checkpoint."""
        return {**{TRUSTED_PREFIX + n: t for n, t in (self.trusted or {}).items()},
                **self.reference.checkpoint()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take back :meth:`tensors` from a checkpoint (none there: no trusted mean)."""
        saved = {n[len(TRUSTED_PREFIX):]: t for n, t in tensors.items() if n.startswith(TRUSTED_PREFIX)}
        if set(saved) == set(self.names):
            self.trusted = {n: t.to(torch.float32).clone() for n, t in saved.items()}
        elif saved:
            log.warning("the checkpoint's trusted mean does not match the model; left out")
        if not self.reference.load_checkpoint(tensors, self.names):
            log.warning("the checkpoint's reference direction does not match the model; left out")

    def _remember(self, norm: float, tensor_norms: dict[str, float], distance: float | None) -> None:
        self.norms.append(norm)
        for name, value in tensor_norms.items():
            self.tensor_shares[name].append(value / norm if norm > 0 else 0.0)
        if distance is not None:
            self.distances.append(distance)

    def _screen(self, delta: dict[str, torch.Tensor], norm: float, tensor_norms: dict[str, float],
                centre: Mapping[str, torch.Tensor] | None, sender: str, *, scale: float,
                against: str = "server's momentum") -> Screening:
        """Screen a delta judged at ``norm`` (a full round's size: ``scale`` times its own): its
        size against the accepted ones', then its direction against ``centre``."""
        if self._has_history(self.norms):  # else: the intake's absolute bounds only
            k = self.config.reject_ratio
            median = statistics.median(self.norms)
            if norm > k * median:
                why = f"|g| = {norm:.3g} > {k:g} × median {median:.3g}"
                return Screening(GuardDecision(None, "norm_outlier", why))
            for name, value in tensor_norms.items():
                seen = self.tensor_shares[name]
                share = value / norm if norm > 0 else 0.0
                median_share = statistics.median(seen) if seen else 0.0
                if median_share > 0 and share > k * median_share:
                    why = f"tensor {name!r} holds {share:.3g} of |g|, > {k:g} × median {median_share:.3g}"
                    return Screening(GuardDecision(None, "tensor_outlier", why))
        cosine = cosine_to(delta, centre, delta_norm=norm / scale)  # norm: ``scale`` × |delta|
        if cosine is None:  # nothing to judge its direction by yet (a run's first deltas)
            if self.trial is None:
                return Screening()
            return Screening(tried=GuardDecision(None, "no_descent", "no direction to judge it by yet"))
        # read back by benchmarks/direction_replay.py
        log.debug("delta of %s: cosine %.4f to the %s", sender or "?", cosine, against)
        verdict = self.direction.judge(sender, cosine)
        if verdict in (REFUSE, TRY):
            why = f"cosine to the {against} {cosine:.2f} < {self.direction.refused_below:.2g}"
            if self.direction.distrusted:
                why += (", the median of accepted deltas: most of this sender's recent deltas pointed "
                        "against it")
            refusal = GuardDecision(None, "against_momentum", why)
            if verdict == TRY:  # if let in, damped as the plain rule would have it
                return Screening(None, cosine, self.direction.tried_damped, tried=refusal)
            return Screening(refusal, cosine)
        return Screening(None, cosine, verdict == DAMP)

    def _try(self, delta: Mapping[str, torch.Tensor], sender: str,
             refusal: GuardDecision) -> GuardDecision | None:
        """The trial of a delta the direction check cannot vouch for (``delta`` as it would be
        applied): None where it lowers the trusted loss (counted as ``distrust_cleared``), else
        ``refusal`` with the trial's word added."""
        assert self.trial is not None
        self.counts["distrust_tried"] += 1
        why = self.trial(delta)
        if why is None:
            self.counts["distrust_cleared"] += 1
            log.debug("delta of %s tried on the operator's data: let in", sender or "?")
            return None
        return self._refuse(sender, GuardDecision(None, refusal.reason,
                                                  f"{refusal.detail}; on the operator's data {why}"))

    def _refuse(self, sender: str, refusal: GuardDecision) -> GuardDecision:
        """Count ``refusal`` of ``sender``'s delta by its reason and put it on the sender's record.
        A direction refusal is no strike: when the momentum itself is wrong (the valve's case),
        honest senders are refused that way until the valve stands aside."""
        self.probation.strike(sender, refusal.reason != "against_momentum")
        self.counts[refusal.reason] += 1
        return refusal

    def _descent(self, delta: Mapping[str, torch.Tensor]) -> str | None:
        """The descent check's refusal of every ``descent_every``-th delta that got this far."""
        if self.descent is None:
            return None
        self.passed_since_descent += 1
        if self.passed_since_descent < self.config.descent_every:
            return None
        self.passed_since_descent = 0
        self.counts["descent_checked"] += 1
        return self.descent(delta)

    def _has_history(self, seen: deque[float]) -> bool:
        """Enough accepted deltas for a statistic: ``min_history`` of them, or any once a trusted
        warm start began them (its deltas need no protection from a liar among the first few, so
        a stranger's first delta after even one trusted round is judged)."""
        return len(seen) >= self.config.min_history or (self.trusted_start and len(seen) > 0)

    def _tau(self) -> float | None:
        if not self._has_history(self.distances):
            return None
        return self.config.clip_ratio * statistics.median(self.distances)

    def save_state(self) -> dict[str, Any]:
        """The statistics, for a checkpoint: a restart must not reopen the start-up window."""
        return {"guard": {"norms": list(self.norms), "distances": list(self.distances),
                          "tensor_shares": {n: list(v) for n, v in self.tensor_shares.items()},
                          "records": self.probation.save_state(),
                          **self.direction.save_state(),
                          "reference_voters": self.reference.save_state(),
                          "trusted_start": self.trusted_start,
                          "counts": dict(self.counts)}}

    def load_state(self, state: dict[str, Any]) -> None:
        state = state.get("guard") or {}  # a checkpoint from before the guard: no statistics yet
        self.norms.clear()
        self.norms.extend(float(v) for v in state.get("norms") or [])
        self.distances.clear()
        self.distances.extend(float(v) for v in state.get("distances") or [])
        saved = state.get("tensor_shares") or {}
        for name, seen in self.tensor_shares.items():
            seen.clear()
            seen.extend(float(v) for v in saved.get(name) or [])
        self.trusted_start = bool(state.get("trusted_start"))
        self.probation.load_state(state.get("records") or {})
        self.direction.load_state(state)
        self.reference.load_state(state.get("reference_voters") or [])
        self.counts.clear()  # the same Counter the direction check counts in
        self.counts.update({str(k): int(v) for k, v in (state.get("counts") or {}).items()})


def momentum_centre(optimizer: Any) -> Centre:
    """The centre for :meth:`DeltaGuard.judge` from an outer optimizer: ``(1 − β)·m``, its
    momentum's running mean of deltas (m = β·m + ḡ adds up to ḡ/(1 − β)); None while m is zero
    (strategies without momentum, and before the first cycle ends)."""

    def centre() -> Mapping[str, torch.Tensor] | None:
        momentum = optimizer.momentum
        if not any(bool(m.any()) for m in momentum.values()):
            return None
        return Scaled(momentum, 1.0 - optimizer.config.momentum)

    return centre
