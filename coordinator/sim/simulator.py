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
based on an old version, exactly as it would in a real run. A round is computed when it starts,
unless it may move onto θ mid-way (``SimConfig.overlap`` "rebase", ``follow``: the client's
``--overlap`` and ``--follow``): then it is trained piece by piece, up to each event that moves it.

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
from dataclasses import replace
from typing import Any

import torch

from coordinator.admission import StalenessBound
from coordinator.descent import DescentCheck
from coordinator.guard import DeltaGuard, momentum_centre
from coordinator.outer_optimizer import make_outer_optimizer
from coordinator.patches import PatchMaker
from coordinator.seed_round import seed_round
from coordinator.sim.attacks import Forger, backdoor_batches
from coordinator.sim.config import HETEROGENEITY, OVERLAP, SimConfig, SimPoint, SimResult, speed_profile
from coordinator.sim.run_state import Round, RunState, Segments
from shared.codecs import get_codec
from shared.dylu import local_steps_for
from shared.error_feedback import ErrorFeedback
from shared.local_round import InnerConfig, LocalTrainer
from shared.round_plan import RoundMode, RoundPlan

# the run's description lives in coordinator.sim.config; its names are also here, where they were
__all__ = ["HETEROGENEITY", "OVERLAP", "SimConfig", "SimPoint", "SimResult", "Simulation", "speed_profile"]

MAX_IN_FLIGHT = 1  # an overlapping worker's deltas on the way while it trains (client/overlap.py)

log = logging.getLogger(__name__)


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
                           full_steps=config.local_steps, descent=descent, trial=descent.strict)
        state = RunState(model=model, outer=outer, guard=guard,
                          forger=Forger(config.attack, seed=config.seed),
                          patches=None if config.patches == "none" else PatchMaker(config.patches))
        state.record(self.task, 0.0, result)
        if config.guard.seed_round and guard.mode.screens and not config.warm_start_steps:
            # the coordinator's own round (coordinator.seed_round; the warm start's are trusted)
            guard.observe(seed_round(self.task, config.inner, outer.params, steps=config.local_steps,
                                     device=self.device, seed=config.seed + 7919))
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

    def _round(self, trainer: LocalTrainer, fb: ErrorFeedback, steps: int,
               state: RunState) -> tuple[dict[str, torch.Tensor], int, int]:
        """One local round from the current global θ; returns the decoded delta, steps, tokens."""
        trainer.load_base(state.base())
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
                    state: RunState, result: SimResult) -> None:
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
                  state: RunState, result: SimResult) -> None:
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
                   state: RunState, result: SimResult) -> None:
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
        training: dict[int, Round] = {}  # the round each worker trains (computed at its start)
        sent: dict[int, list[Round]] = {i: [] for i in range(len(trainers))}  # on the way (overlap)
        blocked: set[int] = set()  # done training, waiting for room for another delta in flight
        segments: dict[int, Segments] = {}  # rounds trained piece by piece (rebase, follow)
        online = set(range(len(trainers)))
        waiting: dict[int, int] = {}  # worker -> the tie-break of its grace deadline event
        grace = 0.0 if config.overlapping else config.grace_rounds * config.local_steps / max(config.speeds)

        def active_weight() -> float | None:
            if not outer_config.compute_exponent:
                return None
            return sum(outer_config.weights_of([last_steps[j] for j in online], config.local_steps))

        def start(i: int) -> None:
            nonlocal counter
            steps = local_steps_for(plan, f"worker-{i}", config.speeds[i])  # no assignments: own speed
            speed = config.speeds[i] * (math.exp(noise.gauss(0.0, config.jitter)) if config.jitter else 1.0)
            counter += 1
            trained = state.now + steps / speed
            trainer = trainers[i]
            trainer.load_base(state.base())
            if config.overlapping and sent[i]:  # the client's stacking (client/overlap.py)
                share = state.outer.arrival_share(state.outer.buffer_weight(len(online), active_weight()))
                for r in sent[i]:
                    weight = outer_config.weight_of(r.steps, config.local_steps)
                    trainer.stack_on_base(r.delta, share * weight)
                trainer.reset_to_base()
            if config.follow or (config.overlap == "rebase" and sent[i]):  # it may move mid-round
                segments[i] = Segments(steps, speed, state.now, base=state.updates)
            else:
                stats = trainer.train(steps, global_step=state.steps)
                delta = self._sent(trainer, feedback[i])
                training[i] = Round(delta, stats.steps, stats.tokens, state.updates)
            done_at = trained if config.overlapping else trained + config.latency
            heapq.heappush(events, (done_at, counter, i, "done"))

        def train_until_now(i: int) -> Segments:
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

        def finish(i: int) -> Round:
            """The round of worker ``i`` as it is sent: the rest of its steps, then its delta."""
            round_ = segments.pop(i, None)
            if round_ is None:
                return training.pop(i)
            round_.tokens += trainers[i].train(round_.steps - round_.ran, global_step=state.steps).tokens
            return Round(self._sent(trainers[i], feedback[i]), round_.steps, round_.tokens, round_.base)

        def moved(i: int) -> None:
            """After worker ``i``'s delta arrived: which rounds move onto θ (follow: all of them)."""
            for j in list(segments) if config.follow else [i]:
                move(j)

        def arrive(i: int, done: Round) -> bool | None:
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
            online_ids = [i, *(j for j in online if j != i)]
            weight = outer_config.weights_of([last_steps[j] for j in online_ids], config.local_steps)[0]
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
