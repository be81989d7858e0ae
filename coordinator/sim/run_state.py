"""The state of one simulated run as the simulator moves it: θ and the coordinator's guard and
optimizer, the clock, the counters, and the rounds in flight."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.guard import DeltaGuard
from coordinator.patches import PatchMaker
from coordinator.sim.attacks import CONTROL, Forger, trigger_loss
from coordinator.sim.config import SimConfig, SimPoint, SimResult


@dataclass
class Round:
    """A worker's round, computed at its start: its decoded delta, steps, tokens and base (updates)."""

    delta: dict[str, torch.Tensor]
    steps: int
    tokens: int
    base: int


@dataclass
class Segments:
    """A round trained piece by piece, moving onto θ between pieces: its steps and speed, when it
    started, the steps run and tokens so far, and its base (updates at the last move)."""

    steps: int
    speed: float
    started: float
    base: int
    ran: int = 0
    tokens: int = 0


@dataclass
class RunState:
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
              result: SimResult) -> Mapping[str, torch.Tensor] | None:
        """What the coordinator applies of worker ``worker``'s delta of ``steps`` local steps
        (forged if it lies): the intake's absolute norm bound, then the guard; None if refused."""
        attacker = config.attack.is_attacker(worker)
        bound = config.max_norm_ratio * norm_of(self.outer.params)
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
                    if norm_of(delta) <= bound else None)
        if decision is None or decision.refused:
            counts[f"{who}_refused"] = counts.get(f"{who}_refused", 0) + 1
            return None
        if decision.clipped or decision.damped:
            counts[f"{who}_clipped"] = counts.get(f"{who}_clipped", 0) + 1
        return decision.delta

    def maybe_record(self, task: Any, config: SimConfig, result: SimResult) -> None:
        if self.steps >= self.next_eval + config.eval_every_steps:
            self.next_eval = self.steps - self.steps % config.eval_every_steps
            self.record(task, self.now, result)


def norm_of(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors.values()))
