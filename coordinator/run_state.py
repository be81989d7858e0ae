"""The run's state in one home: its components, their checkpoint, the plan and the progress.

A :class:`RunState` is everything a checkpoint holds and a restart restores: θ and the outer
optimizer, the client registry, the intake's counters, the run's progress, the sync round or the
warm start, the applied log's committed length, the version counter and the eval history. The
service (:mod:`coordinator.service`) only orchestrates it: it feeds deliveries to ``intake``,
asks when a commit or a sync round is due, and writes what :meth:`RunState.checkpoint` returns.

A new component that must survive a restart is one more entry in ``components``: an object with
``save_state() -> dict`` (its top-level keys of the checkpoint's JSON state) and
``load_state(state)``.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from dataclasses import asdict, replace
from typing import Any, Protocol

import torch

from coordinator.admission import (
    AdmissionRule,
    Arrival,
    AssignmentBound,
    LocalStepsBound,
    OnePerBase,
    RateLimit,
    StalenessBound,
)
from coordinator.applied_log import AppliedLog
from coordinator.checkpoint import Checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.descent import DescentCheck
from coordinator.guard import DeltaGuard, momentum_centre
from coordinator.identity import AuthMode, InvitedSenders, OpenSenders, SenderCheck
from coordinator.intake import DeltaIntake
from coordinator.memory_trim import trim as trim_memory
from coordinator.outer_optimizer import OuterOptimizer, SyncNesterov, make_outer_optimizer
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry
from coordinator.run_mode import RunMode, round_mode
from coordinator.seed_round import seed_round
from coordinator.sync_round import SyncBarrier
from coordinator.volunteers import VolunteerBook
from coordinator.warm_start import WarmStart
from shared.round_plan import RoundMode, RoundPlan
from shared.tasks import load_task

log = logging.getLogger(__name__)

EVAL_HISTORY = 500  # evaluations kept in the checkpoint and the state


class Persistent(Protocol):
    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def admission_rules(config: CoordinatorConfig, *, barrier: SyncBarrier | None,
                    warm: WarmStart, registry: ClientRegistry) -> list[AdmissionRule]:
    """The intake's admission rules, in the order they are asked (the first refusal wins).

    The rate limit first: every delta that gets this far costs its sender a token. A sync round
    has its own one-per-round rule; an asynchronous run takes one delta per client per base.
    """
    intake = config.intake
    rate: list[AdmissionRule] = (
        [RateLimit(burst=intake.delta_burst, per_minute=intake.max_deltas_per_minute)]
        if intake.max_deltas_per_minute > 0 else []
    )
    mode_rules: list[AdmissionRule] = [barrier] if barrier is not None else [warm, OnePerBase(registry)]
    return [
        *rate,
        *mode_rules,
        StalenessBound(intake.max_staleness),
        LocalStepsBound(intake.max_local_steps),
        AssignmentBound(registry),
    ]


def build_intake(config: CoordinatorConfig, *, optimizer: OuterOptimizer, registry: ClientRegistry,
                 progress: RunProgress, warm: WarmStart, barrier: SyncBarrier | None,
                 run_id: str, guard: DeltaGuard | None = None,
                 senders: SenderCheck | None = None) -> DeltaIntake:
    """The intake of a run: its admission rules, and θ moved by the outer optimizer after the
    guard's judgement, or adopted whole while the warm start lasts (its holder is trusted: the
    guard learns from its deltas)."""

    outer, full = config.outer, config.plan.local_steps
    if guard is None:  # the run state hands in its own, which it checkpoints
        guard = DeltaGuard(config.guard, list(optimizer.params), centre=momentum_centre(optimizer),
                           full_steps=full)

    def apply(delta: dict[str, torch.Tensor], arrival: Arrival,
              active_ids: set[str]) -> tuple[str, str] | None:
        if warm.active:
            guard.observe(delta)
            optimizer.adopt(delta)
            return None
        decision = guard.judge(delta, local_steps=arrival.local_steps, sender=arrival.client_id)
        if decision.delta is None:
            return decision.reason, decision.detail
        applied = decision.delta
        # Compute weights (OuterConfig.weight_of): the sender's from the steps it claims (bounded
        # by its assignment), the others' from their last applied round (a full one if none yet).
        # Then each held to the weight cap against the others (OuterConfig.weights_of).
        others = (registry.clients[c].last_round_steps if c in registry.clients else 0
                  for c in active_ids - {arrival.client_id})
        weights = outer.weights_of([arrival.local_steps, *others], full)
        weight, active_weight = weights[0], sum(weights)
        # A sync round's deltas all share its base: arrivals before them in the round are no
        # staleness (the simulator's sync run never discounts either).
        staleness = 0 if barrier is not None else arrival.staleness
        optimizer.step(applied, active_clients=len(active_ids), staleness=staleness, weight=weight,
                       active_weight=active_weight if outer.compute_exponent else None)
        return None

    return DeltaIntake(
        config=config.intake, params=optimizer.params, registry=registry, progress=progress,
        rules=admission_rules(config, barrier=barrier, warm=warm, registry=registry), apply=apply,
        run_id=run_id,
        senders=senders,
    )


def new_run_config(config: CoordinatorConfig) -> dict[str, Any]:
    """What every client needs to build the run's task: published in each snapshot's manifest."""
    return {
        "task": config.task,
        "task_settings": dict(config.task_settings),
        "inner": asdict(config.inner),
        "seed": config.seed,
    }


def resume_differences(saved: dict[str, Any], config: CoordinatorConfig) -> list[str]:
    """What ``config`` changes of the checkpoint's run (``saved``: its state), one item per option,
    ``name old → new``: the task, its settings given now, the seed and the inner options stay the
    checkpoint's (every client must build the same model; marked ``kept``); the outer options take
    effect (marked ``applies``). A checkpoint older than its outer options says nothing of them."""
    old_run, new_run = saved["run_config"], new_run_config(config)
    old_settings, old_inner = old_run.get("task_settings") or {}, old_run.get("inner") or {}
    pairs: list[tuple[str, Any, Any, str]] = [
        ("task", old_run.get("task"), config.task, "kept"),
        ("seed", old_run.get("seed"), config.seed, "kept"),
        *((f"task_settings.{k}", old_settings.get(k), v, "kept") for k, v in config.task_settings.items()),
        *((f"inner.{k}", old_inner[k], v, "kept") for k, v in new_run["inner"].items() if k in old_inner),
        *((f"outer.{k}", v, asdict(config.outer).get(k), "applies")
          for k, v in (saved.get("outer_config") or {}).items()),
    ]
    return [f"{name} {old!r} → {new!r} ({effect})" for name, old, new, effect in pairs if old != new]


class RunState:
    """Every component of one run, built from the config (and a checkpoint, when resuming)."""

    def __init__(self, config: CoordinatorConfig, *, run_id: str, run_config: dict[str, Any],
                 applied_log: AppliedLog | None) -> None:
        self.config = config
        self.run_id = run_id
        self.mode = config.outer.mode
        self.run_config = dict(run_config)
        torch.manual_seed(int(run_config["seed"]))
        self.task = load_task(run_config["task"], run_config["task_settings"])
        self.run_config["task_settings"] = self.task.settings_dict()  # defaults filled in
        self.device = torch.device(config.device)
        self.eval_model = self.task.build_model().to(self.device)
        self.optimizer = make_outer_optimizer(dict(self.eval_model.named_parameters()), config.outer)
        self._share_theta()
        self.registry = ClientRegistry(config.plan)
        self.progress = RunProgress()
        self.warm = WarmStart(config.plan.warm_start_steps, progress=self.progress,
                              holder=config.plan.warm_start_client)
        self.barrier = (SyncBarrier(self.registry, timeout_s=config.sync_timeout_s)
                        if self.mode is RunMode.SYNC else None)
        # Who may send: invited volunteers under their own names, or (open) anyone.
        self.volunteers = (VolunteerBook.open(config.checkpoint_dir)
                           if config.auth is AuthMode.INVITE and config.checkpoint_dir is not None else None)
        senders = InvitedSenders(self.volunteers) if self.volunteers is not None else OpenSenders()
        # Judges each delta before it moves θ, around the optimizer's momentum (coordinator.guard).
        # With --guard-descent-every, it also tries deltas on the operator's own data (coordinator.descent);
        # with --guard-distrust (the default), the deltas its direction check cannot vouch for.
        descent = DescentCheck(self.task, self.eval_model, self.optimizer.params, step_share=self._step_share,
                               tolerance=config.guard.descent_tolerance, device=self.device,
                               keep_model=config.guard.descent_every > 0)
        self.guard = DeltaGuard(config.guard, list(self.optimizer.params),
                                centre=momentum_centre(self.optimizer), full_steps=config.plan.local_steps,
                                descent=descent, trial=descent.strict)
        self.intake = build_intake(config, optimizer=self.optimizer, registry=self.registry,
                                   progress=self.progress, warm=self.warm, barrier=self.barrier,
                                   run_id=run_id, guard=self.guard, senders=senders)
        self.applied_log = applied_log
        self.components: list[Persistent] = [self.registry, self.progress, self.intake, self.warm, self.guard]
        if self.barrier is not None:
            self.components.append(self.barrier)
        self.version = 0
        self.commits = 0
        self.eval_history: list[list[float]] = []  # [version, unix time, loss]
        self._theta_committed = 0  # optimizer.theta_updates when the version last advanced
        self._warm_done = not self.warm.active

    @classmethod
    def open(cls, config: CoordinatorConfig, checkpoint: Checkpoint | None,
             applied_log: AppliedLog | None) -> RunState:
        """A new run (no checkpoint) or the checkpoint's run, restored."""
        if checkpoint is None:
            state = cls(config, run_id=f"{config.run}-{uuid.uuid4().hex[:12]}",
                        run_config=new_run_config(config), applied_log=applied_log)
            saved: dict[str, Any] = {}
        else:
            saved = checkpoint.state
            differences = resume_differences(saved, config)
            if differences:
                log.warning("resuming run %s with options that differ from its checkpoint (kept: the "
                            "checkpoint's value stays; applies: the new one does): %s",
                            config.run, "; ".join(differences))
            state = cls(config, run_id=saved["run_id"], run_config=saved["run_config"],
                        applied_log=applied_log)
            state.restore(checkpoint)
        if applied_log is not None:
            # Entries past the checkpoint's recorded length belong to a batch that never committed.
            applied_log.reset(int(saved.get("applied_log_bytes", 0)))
        return state

    def seed_guard(self, steps: int | None = None) -> None:
        """The guard's trusted start at a fresh run (coordinator.seed_round): a round of H steps
        (``steps``: a benchmark's fewer) trained here, which the guard learns from; θ does not
        move. A resume keeps the guard's statistics in the checkpoint instead. The trainer's
        memory (its model, AdamW state and activations: a peak of 19 × the model's fp32 bytes
        for the 100M model, docs/SCALING.md) goes back to the OS afterwards."""
        self.guard.observe(seed_round(self.task, self.config.inner, self.optimizer.params,
                                      steps=steps or self.config.plan.local_steps, device=self.device))
        gc.collect()
        trim_memory()

    # ---------------------------------------------------------------- sync rounds
    def sync_round_due(self, now: float) -> bool:
        """True when the sync round has every delta it waits for (or timed out with some)."""
        return self.barrier is not None and self.barrier.ready(now)

    def complete_sync_round(self) -> int:
        """One Nesterov step on the round's mean; the next round is on the version it makes."""
        assert self.barrier is not None and isinstance(self.optimizer, SyncNesterov)
        arrived = len(self.barrier.arrived)
        self.optimizer.complete_round()
        self.barrier.next_round(self.version + 1)
        return arrived

    # ---------------------------------------------------------------- versions
    def start_at(self, version: int) -> None:
        """Serve from ``version`` (the first one this process publishes)."""
        self.version = version
        self.intake.take_version(version)
        if self.barrier is not None:
            # θ does not move inside a sync round, so this version is the resumed round's base.
            self.barrier.base_version = version

    def advance_version(self) -> bool:
        """Take a new version number if θ changed since the last one; True if it did."""
        if self.optimizer.theta_updates == self._theta_committed:
            return False
        self._theta_committed = self.optimizer.theta_updates
        self.version += 1  # a sync round's barrier already waits on it (complete_sync_round)
        self.intake.take_version(self.version)
        return True

    def published(self, version: int, at: float) -> None:
        """Snapshot ``version`` was published at unix time ``at`` (the service calls this after each
        publish): no round on it can have started earlier, which is how clients' speeds are measured
        (:mod:`coordinator.registry`). Kept for recent versions, in the checkpoint."""
        self.registry.note_published(version, at)

    def warm_start_ended(self) -> bool:
        """True once, at the first call after the warm start's last step."""
        if self._warm_done or self.warm.active:
            return False
        self._warm_done = True
        return True

    # ---------------------------------------------------------------- what is published
    def plan(self, now: float) -> RoundPlan:
        """The round plan to publish, in the mode the run is in now."""
        warming = self.warm.active
        mode = round_mode(self.mode, dylu=self.config.plan.dylu, warming_up=warming)
        plan = replace(self.registry.plan(self.run_id, now, mode,
                                          warm_client=self.warm.current_holder(now) if warming else ""),
                       delta_queues=self.config.queue.count)
        if mode not in (RoundMode.DYLU, RoundMode.FIXED):
            return plan
        return replace(plan, arrival_share=self._arrival_share(now))

    def _arrival_share(self, now: float) -> float:
        """The share of a full round's delta θ moves by at its arrival, with the buffer weight of
        the clients active now (as the intake's outer step counts it: in compute weights)."""
        outer, full = self.config.outer, self.config.plan.local_steps
        active = self.registry.active(now)
        weights = (sum(outer.weights_of([c.last_round_steps for c in active], full))
                   if outer.compute_exponent and active else None)
        return self.optimizer.arrival_share(self.optimizer.buffer_weight(max(1, len(active)), weights))

    def progress_doc(self, now: float) -> dict[str, Any]:
        """Global progress, and each active client's newest applied seq (so that a client can see
        its last delta is in before it starts its next round)."""
        return {
            "updates": self.intake.counts["applied"],
            **self.progress.as_dict(),
            "client_seqs": {c.client_id: c.max_seq for c in self.registry.active(now)},
            "cycle_open": self.cycle_open,
        }

    @property
    def cycle_open(self) -> bool:
        """The outer buffer holds deltas whose momentum step is still to come (RoundPlan.grace_s)."""
        return self.optimizer.pending > 0

    def _step_share(self) -> float:
        """γ of the descent check: the share of a delta one arrival's outer step applies, ε/N."""
        active = len(self.registry.active(time.time()))
        return self.config.outer.lr / self.optimizer.buffer_weight(max(1, active), None)

    # ---------------------------------------------------------------- evaluation
    def eval_is_stale(self) -> bool:
        """True when the newest committed version has not been evaluated yet."""
        return not self.eval_history or self.eval_history[-1][0] != self.version

    def _share_theta(self) -> None:
        """On the CPU, the evaluation model's parameters become θ's tensors (one copy of the model
        less: docs/BENCHMARKS.md, coordinator_memory.py); elsewhere θ is copied in to evaluate."""
        if self.device.type != "cpu":
            return
        with torch.no_grad():
            for name, param in self.eval_model.named_parameters():
                theta = self.optimizer.params[name]
                if param.shape == theta.shape and param.dtype == theta.dtype:
                    param.data = theta

    def evaluate(self) -> float:
        with torch.no_grad():
            for name, param in self.eval_model.named_parameters():
                theta = self.optimizer.params[name]
                if param.data_ptr() != theta.data_ptr():  # not shared (another device)
                    param.copy_(theta)
        loss = float(self.task.evaluate(self.eval_model, self.device))
        self.eval_history.append([self.version, time.time(), loss])
        del self.eval_history[:-EVAL_HISTORY]
        return loss

    @property
    def latest_eval(self) -> float:
        return self.eval_history[-1][2] if self.eval_history else float("nan")

    # ---------------------------------------------------------------- checkpoint
    def checkpoint(self) -> Checkpoint:
        state: dict[str, Any] = {
            "run": self.config.run,
            "run_id": self.run_id,
            "version": self.version,
            "run_config": self.run_config,
            "outer_config": asdict(self.config.outer),  # what a resume compares its options with
            "outer_pending": self.optimizer.pending,
            "outer_arrivals": self.optimizer.arrivals,
            "outer_filled": self.optimizer.filled,
            "eval_history": self.eval_history[-EVAL_HISTORY:],
            "commits": self.commits,
            "applied_log_bytes": self.applied_log.length if self.applied_log else 0,
            "saved_at": time.time(),
        }
        for component in self.components:
            state.update(component.save_state())
        return Checkpoint(tensors={**self.optimizer.tensors(), **self.guard.tensors()}, state=state)

    def restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        self.optimizer.load_tensors(checkpoint.tensors, pending=int(state["outer_pending"]),
                                    arrivals=int(state["outer_arrivals"]),
                                    filled=state.get("outer_filled"))
        for component in self.components:
            component.load_state(state)
        self.guard.load_tensors(checkpoint.tensors)
        self.eval_history = state["eval_history"]
        self.version = checkpoint.version
        self.commits = int(state.get("commits", 0))
        self._warm_done = not self.warm.active
