"""What one simulated run is (:class:`SimConfig`) and what it gives (:class:`SimResult`); speed
profiles of the heterogeneity levels. The runner is :mod:`coordinator.sim.simulator`."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from coordinator.guard import GuardConfig
from coordinator.intake import IntakeConfig
from coordinator.outer_optimizer import ASYNC_STRATEGIES, STRATEGIES, OuterConfig
from coordinator.sim.attacks import AttackConfig
from shared.codecs import get_codec
from shared.errors import ConfigError
from shared.local_round import InnerConfig

OVERLAP = ("off", "stack", "rebase")

# Slowest worker's speed relative to the fastest, per heterogeneity level; speeds are spaced
# geometrically in between (4 workers at "very": 1, 1/2, 1/4, 1/8).
HETEROGENEITY = {"none": 1.0, "slight": 1 / 1.5, "moderate": 1 / 3.0, "very": 1 / 8.0}


def speed_profile(level: str, workers: int, *, sigma: float = 0.75, seed: int = 0) -> list[float]:
    """Relative speeds (fastest = 1) for a heterogeneity level or ``lognormal``."""
    if workers < 1:
        raise ConfigError("need at least one worker")
    if level == "lognormal":
        rng = random.Random(seed)
        raw = [math.exp(rng.gauss(0.0, sigma)) for _ in range(workers)]
        return sorted((r / max(raw) for r in raw), reverse=True)
    if level not in HETEROGENEITY:
        raise ConfigError(f"unknown heterogeneity {level!r} (known: {', '.join(HETEROGENEITY)}, lognormal)")
    slowest = HETEROGENEITY[level]
    if workers == 1:
        return [1.0]
    return [slowest ** (i / (workers - 1)) for i in range(workers)]


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. ``budget_steps`` is the total local steps of the honest workers together
    (all workers', without attackers)."""

    strategy: str = "edn+dylu"
    speeds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    local_steps: int = 30
    min_local_steps: int = 5
    budget_steps: int = 1200
    eval_every_steps: int = 200
    outer: OuterConfig = OuterConfig()
    inner: InnerConfig = InnerConfig()
    codec: str = "fp16"
    # workers start from θ (none) or from θ̂, the model that snapshot patches in this codec carry
    # (coordinator/patches.py): a new θ̂ each time a worker starts after θ moved
    patches: str = "none"
    latency: float = 0.0
    jitter: float = 0.0  # sigma of each round's lognormal speed noise
    # After its delta, a worker whose arrival did not end the buffer's cycle waits up to this many
    # full rounds (H steps of the fastest) for the cycle to end, so that it starts from θ with the
    # cycle's momentum step (0: start at once).
    grace_rounds: float = 0.25
    # The client's --overlap: a worker starts its next round as soon as its compute ends (its delta
    # still on the way, ``latency``), from θ moved by its own in-flight delta as the coordinator will
    # move it (client/overlap.py), with no grace ("stack"); with "rebase" it also carries its
    # progress onto θ when its delta lands (LocalTrainer.rebase, client/overlap.MidRoundRebase).
    overlap: str = "off"
    # A round moves onto θ each time θ changes while it trains (its progress carried: the client's
    # --follow), instead of training on from the base it started from.
    follow: bool = False
    max_staleness: int = 0  # the coordinator's --max-staleness (0: automatic)
    churn_leave_prob: float = 0.0  # chance a worker goes offline after a round
    churn_offline_mean: float = 0.0  # mean offline time (exponential)
    # The coordinator's --warm-start-steps: the fastest worker trains alone (θ -= g) this long first.
    warm_start_steps: int = 0
    # The coordinator's guard (coordinator.guard) and the intake's absolute norm bound, which
    # every delta passes through; attackers among the workers (coordinator.sim.attacks).
    guard: GuardConfig = GuardConfig()
    max_norm_ratio: float = IntakeConfig().max_norm_ratio
    attack: AttackConfig = AttackConfig()
    measure_trigger: bool = False  # record the backdoor's trigger loss at every eval
    seed: int = 0

    def __post_init__(self) -> None:
        base, _, suffix = self.strategy.partition("+")
        if base not in STRATEGIES or suffix not in ("", "dylu") or (base == "sync" and suffix):
            raise ConfigError(f"unknown strategy {self.strategy!r}: use sync or one of "
                              f"{', '.join(ASYNC_STRATEGIES)} with an optional '+dylu'")
        if not self.speeds or min(self.speeds) <= 0:
            raise ConfigError("speeds must be positive")
        if self.local_steps < 1 or not 1 <= self.min_local_steps <= self.local_steps:
            raise ConfigError("need 1 <= min_local_steps <= local_steps")
        if self.budget_steps < 1 or self.eval_every_steps < 1 or self.latency < 0 or self.jitter < 0:
            raise ConfigError("budget and eval interval must be >= 1, latency and jitter >= 0")
        if self.warm_start_steps < 0 or self.grace_rounds < 0:
            raise ConfigError("warm start steps and grace must be >= 0")
        if self.overlap not in OVERLAP:
            raise ConfigError(f"overlap must be one of {', '.join(OVERLAP)}")
        if self.overlapping and self.churn_leave_prob:
            raise ConfigError("the simulator does not model churn with overlap")
        if not 0 <= self.churn_leave_prob < 1 or self.churn_offline_mean < 0:
            raise ConfigError("churn leave probability must be in [0, 1), offline mean >= 0")
        get_codec(self.codec)
        if self.patches != "none":
            get_codec(self.patches)
        if self.attack.attackers >= len(self.speeds):
            raise ConfigError("at least one worker must be honest")

    @property
    def overlapping(self) -> bool:
        return self.overlap != "off"

    @property
    def base_strategy(self) -> str:
        return self.strategy.partition("+")[0]

    @property
    def dylu(self) -> bool:
        return self.strategy.endswith("+dylu")


@dataclass
class SimPoint:
    virtual_time: float
    updates: int
    local_steps: int
    tokens: int
    eval_loss: float
    trigger_loss: float | None = None
    control_loss: float | None = None  # the same after the trigger with attacks.CONTROL as payload


@dataclass
class SimResult:
    config: SimConfig
    curve: list[SimPoint] = field(default_factory=list)
    steps_per_worker: list[int] = field(default_factory=list)
    max_staleness: int = 0
    discarded_stale: int = 0
    # honest_/attack_ + judged, refused (by the guard or the absolute bound), clipped
    guard_counts: dict[str, int] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.curve[-1].eval_loss

    def time_to_reach(self, loss: float) -> float | None:
        """Virtual time at which eval loss first reached ``loss`` (linear between evals)."""
        for prev, point in zip(self.curve, self.curve[1:], strict=False):
            if point.eval_loss <= loss:
                if prev.eval_loss == point.eval_loss:
                    return point.virtual_time
                frac = (prev.eval_loss - loss) / (prev.eval_loss - point.eval_loss)
                return prev.virtual_time + max(0.0, min(1.0, frac)) * (point.virtual_time - prev.virtual_time)
        return None
