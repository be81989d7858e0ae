"""A virtual-clock simulator of asyncloco: W workers in one process, real code, simulated time.

Each worker runs the client's own local round (:class:`shared.local_round.LocalTrainer`), its delta
goes through the real codec with error feedback (:mod:`shared.codecs`), the intake's absolute norm
bound and the coordinator's own delta guard (:mod:`coordinator.guard`), and the coordinator's own
outer optimizer applies it (:mod:`coordinator.outer_optimizer`). Some workers may lie
(:mod:`coordinator.sim.attacks`); the budget counts honest workers' steps only. Only time is
simulated: a local step of a worker with speed ``v`` takes ``1 / v`` time units (one unit = one step
of a speed-1 worker), an upload adds ``latency``, and with ``jitter`` each round's speed is the
worker's own times lognormal(0, jitter) noise (so equal-speed workers do not arrive in one fixed
order). As in the coordinator, staleness counts arrivals (deltas applied since the round's base) and
deltas past the staleness bound are discarded (:class:`coordinator.admission.StalenessBound`);
compute weights (``OuterConfig.compute_exponent``) use the sender's steps and every other online
worker's last round, as the intake does. A discrete-event queue orders round completions, so 2 CPU
cores can faithfully simulate 16 or 64 heterogeneous workers: a slow worker's delta arrives late,
based on an old version, exactly as it would in a real run.

Strategies: ``dn``, ``nesterov``, ``sgd``, ``fedbuff`` (asynchronous, see
:mod:`coordinator.outer_optimizer`), each optionally ``+dylu`` (Dynamic Local Updates: H_i from the
worker's speed), and ``sync`` (synchronous DiLoCo: every round waits for all online workers' H
steps on the same base, then one Nesterov step on their mean).
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from coordinator.admission import StalenessBound
from coordinator.descent import DescentCheck
from coordinator.guard import DeltaGuard, GuardConfig, momentum_centre
from coordinator.intake import IntakeConfig
from coordinator.outer_optimizer import ASYNC_STRATEGIES, STRATEGIES, OuterConfig, make_outer_optimizer
from coordinator.patches import PatchMaker
from coordinator.sim.attacks import CONTROL, AttackConfig, Forger, backdoor_batches, trigger_loss
from shared.codecs import ErrorFeedback, get_codec
from shared.dylu import local_steps_for
from shared.errors import ConfigError
from shared.local_round import InnerConfig, LocalTrainer
from shared.round_plan import RoundMode, RoundPlan

OVERLAP = ("off", "stack", "rebase")
MAX_IN_FLIGHT = 1  # an overlapping worker's deltas on the way while it trains (client/overlap.py)

log = logging.getLogger(__name__)

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


class Simulation:
    """Runs :class:`SimConfig` s on one task (the corpus is loaded once and shared)."""

    def __init__(self, task: Any, *, device: str = "cpu") -> None:
        self.task = task
        self.device = torch.device(device)

    def run(self, config: SimConfig, *, init: dict[str, torch.Tensor] | None = None) -> SimResult:
        """Simulate ``config`` from a fresh model (seeded), or from the parameters ``init``."""
        torch.manual_seed(config.seed)
        model = self.task.build_model().to(self.device)
        if init is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(init[name])
        workers = len(config.speeds)
        outer = make_outer_optimizer(dict(model.named_parameters()),
                                     replace(config.outer, strategy=config.base_strategy))
        codec = get_codec(config.codec)
        trainers = [
            LocalTrainer(task=self.task, inner=config.inner, device=self.device,
                         shard=i % self.task.num_shards, seed=config.seed * 1000 + i)
            for i in range(workers)
        ]
        if config.attack.kind == "backdoor":
            for i in range(config.attack.attackers):
                trainers[i].batches = backdoor_batches(trainers[i].batches, rate=config.attack.backdoor_rate,
                                                       seed=config.seed * 1000 + i)
        feedback = [ErrorFeedback(codec) for _ in range(workers)]
        result = SimResult(config, steps_per_worker=[0] * workers)
        # the descent check (with guard.descent_every) on the task's data, as the coordinator's
        descent = DescentCheck(self.task, model, outer.params, seed=config.seed + 7919,
                               step_share=lambda: config.outer.lr / workers,
                               tolerance=config.guard.descent_tolerance)
        guard = DeltaGuard(config.guard, list(outer.params), centre=momentum_centre(outer),
                           full_steps=config.local_steps, descent=descent)
        state = _RunState(model=model, outer=outer, guard=guard,
                          forger=Forger(config.attack, seed=config.seed),
                          patches=None if config.patches == "none" else PatchMaker(config.patches))
        state.record(self.task, 0.0, result)
        self._warm_start(config, trainers, feedback, state, result)
        if config.base_strategy == "sync":
            self._run_sync(config, trainers, feedback, state, result)
        else:
            self._run_async(config, trainers, feedback, state, result)
        if result.curve[-1].local_steps != state.steps:
            state.record(self.task, state.now, result)
        result.guard_counts.update({f"guard_{k}": v for k, v in sorted(state.guard.counts.items())})
        return result

    def pretrain(
        self, steps: int, *, seed: int = 0, inner: InnerConfig | None = None
    ) -> dict[str, torch.Tensor]:
        """Ordinary single-worker training for ``steps`` (a warm start, as in the paper)."""
        torch.manual_seed(seed)
        trainer = LocalTrainer(task=self.task, inner=inner or InnerConfig(), device=self.device,
                               shard=0, seed=seed + 999)
        trainer.train(steps)
        return {name: p.detach().to("cpu").clone() for name, p in trainer.model.named_parameters()}

    def _round(self, trainer: LocalTrainer, fb: ErrorFeedback, steps: int, state: _RunState, *,
               base: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int, int]:
        """One local round from ``base`` (the current global θ by default); returns the decoded
        delta, steps, tokens."""
        trainer.load_base(state.base() if base is None else base)
        stats = trainer.train(steps, global_step=state.steps)
        return self._sent(trainer, fb), stats.steps, stats.tokens

    @staticmethod
    def _sent(trainer: LocalTrainer, fb: ErrorFeedback) -> dict[str, torch.Tensor]:
        """The round's pseudo-gradient as the coordinator decodes it (through the codec)."""
        delta = {}
        for name, g in trainer.pseudo_gradient().items():
            blob = fb.encode(name, g)  # what the client would send ...
            delta[name] = fb.codec.decode(blob, g.numel()).view_as(g)  # ... and the coordinator gets
        return delta

    def _warm_start(self, config: SimConfig, trainers: list[LocalTrainer], feedback: list[ErrorFeedback],
                    state: _RunState, result: SimResult) -> None:
        """The coordinator's warm start: the fastest worker alone, rounds of H adopted as θ -= g."""
        fastest = max(range(len(trainers)), key=lambda i: config.speeds[i])
        while state.steps < min(config.warm_start_steps, config.budget_steps):
            delta, ran, tokens = self._round(trainers[fastest], feedback[fastest], config.local_steps, state)
            state.now += ran / config.speeds[fastest] + config.latency
            state.guard.observe(delta)  # the holder is trusted
            state.outer.adopt(delta)
            state.updates += 1
            state.steps += ran
            state.tokens += tokens
            result.steps_per_worker[fastest] += ran
            state.maybe_record(self.task, config, result)

    def _run_sync(self, config: SimConfig, trainers: list[LocalTrainer], feedback: list[ErrorFeedback],
                  state: _RunState, result: SimResult) -> None:
        rng = random.Random(config.seed)
        online_until = [0.0] * len(trainers)  # offline while now < online_until
        while state.steps < config.budget_steps:
            online = [i for i in range(len(trainers)) if state.now >= online_until[i]]
            if not online:
                state.now = min(online_until)
                continue
            deltas = []
            for i in online:
                delta, steps, tokens = self._round(trainers[i], feedback[i], config.local_steps, state)
                deltas.append(delta)
                result.steps_per_worker[i] += steps
                state.tokens += tokens
            state.now += max(config.local_steps / config.speeds[i] for i in online) + config.latency
            for i, delta in zip(online, deltas, strict=True):
                admitted = state.admit(config, i, delta, config.local_steps, result)
                if admitted is not None:
                    state.outer.step(admitted, active_clients=len(online))
                    state.updates += 1
            state.outer.complete_round()  # the barrier: one Nesterov step on the round's mean
            state.steps += config.local_steps * sum(not config.attack.is_attacker(i) for i in online)
            for i in online:
                if config.churn_leave_prob and rng.random() < config.churn_leave_prob:
                    online_until[i] = state.now + rng.expovariate(1.0 / max(config.churn_offline_mean, 1e-9))
            state.maybe_record(self.task, config, result)

    def _run_async(self, config: SimConfig, trainers: list[LocalTrainer], feedback: list[ErrorFeedback],
                   state: _RunState, result: SimResult) -> None:
        rng = random.Random(config.seed)
        noise = random.Random(config.seed + 7919)  # round-to-round speed jitter, its own stream
        bound = StalenessBound(config.max_staleness)
        outer_config = config.outer
        last_steps = [config.local_steps] * len(trainers)  # each worker's last applied round
        # the plan a real coordinator would publish, sized by the client's own DyLU code
        plan = RoundPlan(run_id="simulation", local_steps=config.local_steps,
                         min_local_steps=config.min_local_steps, fastest_steps_per_s=max(config.speeds),
                         active_clients=len(trainers),
                         mode=RoundMode.DYLU if config.dylu else RoundMode.FIXED)
        events: list[tuple[float, int, int, str]] = []  # (time, tie-break, worker, kind)
        counter = 0
        training: dict[int, _Round] = {}  # the round each worker trains (computed at its start)
        sent: dict[int, list[_Round]] = {i: [] for i in range(len(trainers))}  # on the way (overlap)
        blocked: set[int] = set()  # done training, waiting for room for another delta in flight
        segments: dict[int, _Segments] = {}  # rounds trained piece by piece (rebase, follow)
        online = set(range(len(trainers)))
        waiting: dict[int, int] = {}  # worker -> the tie-break of its grace deadline event
        grace = 0.0 if config.overlapping else config.grace_rounds * config.local_steps / max(config.speeds)

        def active_weight() -> float | None:
            if not outer_config.compute_exponent:
                return None
            return sum(outer_config.weight_of(last_steps[j], config.local_steps) for j in online)

        def start(i: int) -> None:
            nonlocal counter
            steps = local_steps_for(plan, f"worker-{i}", config.speeds[i])  # no assignments: own speed
            speed = config.speeds[i] * (math.exp(noise.gauss(0.0, config.jitter)) if config.jitter else 1.0)
            counter += 1
            trained = state.now + steps / speed
            base = state.base()
            if config.overlapping and sent[i]:  # the client's stacking (client/overlap.py)
                share = state.outer.arrival_share(state.outer.buffer_weight(len(online), active_weight()))
                base = {name: t.clone() for name, t in base.items()}
                for r in sent[i]:
                    weight = outer_config.weight_of(r.steps, config.local_steps)
                    for name, t in base.items():
                        t.sub_(r.delta[name].view_as(t), alpha=share * weight)
            if config.follow or (config.overlap == "rebase" and sent[i]):  # it may move mid-round
                trainers[i].load_base(base)
                segments[i] = _Segments(steps, speed, state.now, base=state.updates)
            else:
                delta, ran, tokens = self._round(trainers[i], feedback[i], steps, state, base=base)
                training[i] = _Round(delta, ran, tokens, state.updates)
            done_at = trained if config.overlapping else trained + config.latency
            heapq.heappush(events, (done_at, counter, i, "done"))

        def train_until_now(i: int) -> _Segments:
            """Run the steps of worker ``i``'s round that its speed has run by now."""
            round_ = segments[i]
            due = min(round_.steps, int((state.now - round_.started) * round_.speed + 1e-9))
            if due > round_.ran:
                round_.tokens += trainers[i].train(due - round_.ran, global_step=state.steps).tokens
                round_.ran = due
            return round_

        def move(i: int) -> None:
            """θ changed: worker ``i``'s round, if it is still training, goes on from θ with its
            progress so far (LocalTrainer.rebase)."""
            round_ = segments.get(i)
            if round_ is None or state.now >= round_.started + round_.steps / round_.speed:
                return
            train_until_now(i)
            trainers[i].rebase(state.base())
            round_.base = state.updates

        def finish(i: int) -> _Round:
            """The round of worker ``i`` as it is sent: the rest of its steps, then its delta."""
            round_ = segments.pop(i, None)
            if round_ is None:
                return training.pop(i)
            round_.tokens += trainers[i].train(round_.steps - round_.ran, global_step=state.steps).tokens
            return _Round(self._sent(trainers[i], feedback[i]), round_.steps, round_.tokens, round_.base)

        def moved(i: int) -> None:
            """After worker ``i``'s delta arrived: which rounds move onto θ (follow: all of them)."""
            for j in list(segments) if config.follow else [i]:
                move(j)

        def arrive(i: int, done: _Round) -> bool | None:
            """The coordinator's side of one delta's arrival: whether it emptied the buffer, None if
            it was refused."""
            lies = config.attack.kind == "base_lie" and config.attack.is_attacker(i)
            staleness = 0 if lies else state.updates - done.base  # the liar claims the newest base
            state.steps += state.honest(config, i, done.steps)  # spent, whatever its fate (equal compute)
            result.steps_per_worker[i] += done.steps
            if staleness > bound.bound(len(online)):
                result.discarded_stale += 1  # the intake refuses it: the work is lost
                return None
            admitted = state.admit(config, i, done.delta, done.steps, result)
            if admitted is None:  # refused by the guard or the intake's bound: the work is lost
                return None
            result.max_staleness = max(result.max_staleness, staleness)
            last_steps[i] = done.steps
            weight = outer_config.weight_of(done.steps, config.local_steps)
            emptied = state.outer.step(admitted, active_clients=len(online), staleness=staleness,
                                       weight=weight, active_weight=active_weight())
            state.updates += 1
            state.tokens += done.tokens
            state.maybe_record(self.task, config, result)
            return emptied

        for i in range(len(trainers)):
            start(i)
        while events and state.steps < config.budget_steps:
            state.now, tie, i, kind = heapq.heappop(events)
            if kind == "rejoin":
                online.add(i)
                start(i)
                continue
            if kind == "grace":  # waited long enough for the cycle to end: go on
                if waiting.get(i) == tie:
                    del waiting[i]
                    start(i)
                continue
            if config.overlapping:
                if kind == "done":  # sent; the next round starts if at most one delta is on the way
                    sent[i].append(finish(i))
                    counter += 1
                    heapq.heappush(events, (state.now + config.latency, counter, i, "arrive"))
                    (start if len(sent[i]) <= MAX_IN_FLIGHT else blocked.add)(i)
                    continue
                arrive(i, sent[i].pop(0))
                moved(i)
                if i in blocked and len(sent[i]) <= MAX_IN_FLIGHT:
                    blocked.discard(i)
                    start(i)
                continue
            emptied = arrive(i, finish(i))
            if config.follow:
                moved(i)
            if emptied is None:  # refused: the next round starts at once
                start(i)
            elif config.churn_leave_prob and len(online) > 1 and rng.random() < config.churn_leave_prob:
                online.discard(i)
                counter += 1
                back = state.now + rng.expovariate(1.0 / max(config.churn_offline_mean, 1e-9))
                heapq.heappush(events, (back, counter, i, "rejoin"))
            elif emptied:  # the cycle's step is in θ: everyone waiting for it starts now
                for j in list(waiting):
                    del waiting[j]
                    start(j)
                start(i)
            elif grace:
                counter += 1
                waiting[i] = counter
                heapq.heappush(events, (state.now + grace, counter, i, "grace"))
            else:
                start(i)


@dataclass
class _Round:
    """A worker's round, computed at its start: its decoded delta, steps, tokens and base (updates)."""

    delta: dict[str, torch.Tensor]
    steps: int
    tokens: int
    base: int


@dataclass
class _Segments:
    """A round trained piece by piece, moving onto θ between pieces: its steps and speed, when it
    started, the steps run and tokens so far, and its base (updates at the last move)."""

    steps: int
    speed: float
    started: float
    base: int
    ran: int = 0
    tokens: int = 0


@dataclass
class _RunState:
    model: torch.nn.Module
    outer: Any
    guard: DeltaGuard
    forger: Forger
    now: float = 0.0
    updates: int = 0
    steps: int = 0
    tokens: int = 0
    next_eval: int = 0
    patches: PatchMaker | None = None
    served: tuple[int, int] = (-1, -1)  # (updates, version) of the last θ̂ made

    def base(self) -> dict[str, torch.Tensor]:
        """What a worker starts a round from: θ, or θ̂ with snapshot patches (one more version
        each time θ moved since the last)."""
        if self.patches is None:
            return self.outer.params
        if self.served[0] != self.updates:
            version = self.served[1] + 1
            self.patches.patch(run="sim", run_id="sim", version=version, created_at=0.0,
                               params=self.outer.params)
            self.patches.published(version, 0.0)
            self.served = (self.updates, version)
        return self.patches.served

    def record(self, task: Any, now: float, result: SimResult) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(self.outer.params[name])
        loss = float(task.evaluate(self.model, next(self.model.parameters()).device))
        config = result.config
        measure = config.measure_trigger or config.attack.kind == "backdoor"
        trigger = trigger_loss(task, self.model) if measure else None
        control = trigger_loss(task, self.model, CONTROL) if measure else None
        result.curve.append(SimPoint(now, self.updates, self.steps, self.tokens, loss, trigger, control))

    @staticmethod
    def honest(config: SimConfig, worker: int, steps: int) -> int:
        """The steps that count toward the budget: an attacker's do not (equal honest compute)."""
        return 0 if config.attack.is_attacker(worker) else steps

    def admit(self, config: SimConfig, worker: int, delta: dict[str, torch.Tensor], steps: int,
              result: SimResult) -> dict[str, torch.Tensor] | None:
        """What the coordinator applies of worker ``worker``'s delta of ``steps`` local steps
        (forged if it lies): the intake's absolute norm bound, then the guard; None if refused."""
        attacker = config.attack.is_attacker(worker)
        bound = config.max_norm_ratio * _norm(self.outer.params)
        full_round = config.local_steps / max(1, min(steps, config.local_steps))
        if attacker:
            passing = bound
            if self.guard.mode.screens and len(self.guard.norms) >= config.guard.min_history:
                screen = config.guard.reject_ratio * statistics.median(self.guard.norms) / full_round
                passing = min(bound, screen)
            delta = self.forger.forge(delta, passing_norm=passing)
        else:
            self.forger.saw_honest(delta)
        who = "attack" if attacker else "honest"
        counts = result.guard_counts
        counts[f"{who}_judged"] = counts.get(f"{who}_judged", 0) + 1
        decision = (self.guard.judge(delta, local_steps=steps, sender=f"worker-{worker}")
                    if _norm(delta) <= bound else None)
        if decision is None or decision.refused:
            counts[f"{who}_refused"] = counts.get(f"{who}_refused", 0) + 1
            return None
        if decision.clipped:
            counts[f"{who}_clipped"] = counts.get(f"{who}_clipped", 0) + 1
        return decision.delta

    def maybe_record(self, task: Any, config: SimConfig, result: SimResult) -> None:
        if self.steps >= self.next_eval + config.eval_every_steps:
            self.next_eval = self.steps - self.steps % config.eval_every_steps
            self.record(task, self.now, result)


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors.values()))
