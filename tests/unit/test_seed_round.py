"""The guard's seed round (coordinator/seed_round.py): a fresh run's guard learns a delta's size
and direction from one round the coordinator trains itself, before any volunteer's delta; θ stays
where the seed put it (the service's own call of it, after its first contact with Redis, and a
resume that trains no second one: tests/integration/test_coordinator_intake.py)."""

from __future__ import annotations

import torch

from coordinator.config import CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.registry import PlanConfig
from coordinator.run_state import RunState, new_run_config
from coordinator.seed_round import seed_round

TASK = {"model_size": "tiny", "max_corpus_bytes": 200_000, "eval_sequences": 2, "batch_size": 2}
PLAN = PlanConfig(local_steps=4)


def _config(*, plan: PlanConfig = PLAN, guard: GuardConfig = GuardConfig()) -> CoordinatorConfig:
    return CoordinatorConfig(auth=AuthMode.OPEN, task_settings=TASK, plan=plan, guard=guard)


def _theta(run: RunState) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.optimizer.params.items()}


def _unseeded_theta(config: CoordinatorConfig) -> dict[str, torch.Tensor]:
    run = RunState(config, run_id="r", run_config=new_run_config(config), applied_log=None)
    return _theta(run)


def _seeded(config: CoordinatorConfig) -> RunState:
    run = RunState.open(config, None, None)
    run.seed_guard()
    return run


def test_a_fresh_run_is_seeded_without_moving_theta() -> None:
    config = _config()
    run = _seeded(config)
    assert run.guard.trusted_start and len(run.guard.norms) == 1 and run.guard.norms[0] > 0
    assert run.guard.trusted is not None  # the direction judged by until the momentum has one
    before = _unseeded_theta(config)  # the same seed builds the same θ₀
    assert all(torch.equal(before[n], t) for n, t in _theta(run).items())

    # so the first stranger's delta is judged: the seed's own size passes, 16 times it is refused
    honest = seed_round(run.task, config.inner, run.optimizer.params, steps=PLAN.local_steps, seed=11)
    assert not run.guard.judge(honest, local_steps=PLAN.local_steps, sender="a").refused
    scaled = {n: 16 * g for n, g in honest.items()}
    decision = run.guard.judge(scaled, local_steps=PLAN.local_steps, sender="b")
    assert decision.refused and decision.reason == "norm_outlier"


def test_no_seed_round_when_turned_off_after_a_named_warm_start_or_without_a_screening_guard() -> None:
    assert _config().guard_seeds
    assert not _config(guard=GuardConfig(seed_round=False)).guard_seeds
    named = PlanConfig(local_steps=4, warm_start_steps=8, warm_start_client="mine")
    assert not _config(plan=named).guard_seeds
    assert not _config(guard=GuardConfig(mode="off")).guard_seeds
    # a warm start by whoever sends first is no trust anchor: the seed round still runs
    assert _config(plan=PlanConfig(local_steps=4, warm_start_steps=8)).guard_seeds


def test_the_seed_round_is_a_round_of_the_task_and_its_seed_decides_its_data() -> None:
    run = RunState(_config(), run_id="r", run_config=new_run_config(_config()), applied_log=None)
    base = run.optimizer.params
    one, again = (seed_round(run.task, run.config.inner, base, steps=3, seed=5) for _ in range(2))
    other = seed_round(run.task, run.config.inner, base, steps=3, seed=6)
    assert one.keys() == base.keys() and all(g.dtype == torch.float32 for g in one.values())
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert any(not torch.equal(one[n], other[n]) for n in one)
    assert any(float(g.abs().max()) > 0 for g in one.values())
