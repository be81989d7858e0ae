"""The guard's running mean of a warm start's trusted deltas: it survives a restart from the
checkpoint while it is the centre, and is let go once the momentum has a direction of its own."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.config import CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.outer_optimizer import OuterConfig
from coordinator.registry import PlanConfig
from coordinator.run_state import RunState, new_run_config

TASK = {"model_size": "tiny", "max_corpus_bytes": 200_000, "eval_sequences": 2, "batch_size": 2}


def _run() -> RunState:
    config = CoordinatorConfig(auth=AuthMode.OPEN, task_settings=TASK)
    return RunState(config, run_id="r-1", run_config=new_run_config(config), applied_log=None)


def _delta(run: RunState, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in run.optimizer.params.items()}


def test_the_trusted_mean_survives_a_restart_and_goes_once_the_momentum_leads() -> None:
    run = _run()
    run.guard.observe(_delta(run, 1))
    run.guard.observe(_delta(run, 2))
    trusted = run.guard.trusted
    assert trusted is not None
    restored = RunState.open(run.config, run.checkpoint(), None)
    assert restored.guard.trusted is not None and restored.guard.trusted.keys() == trusted.keys()
    assert all(torch.equal(restored.guard.trusted[n], t) for n, t in trusted.items())
    assert restored.guard.trusted_start  # its JSON state came back too, as before

    # the momentum gets a direction (a cycle's step): the mean is no longer the centre, and goes
    restored.optimizer.step(_delta(restored, 3), active_clients=1)
    assert any(bool(m.any()) for m in restored.optimizer.momentum.values())
    restored.guard.judge(_delta(restored, 3), local_steps=restored.config.plan.local_steps, sender="s")
    assert restored.guard.trusted is None
    assert not any(n.startswith("guard_trusted/") for n in restored.checkpoint().tensors)


def test_a_run_without_a_warm_start_keeps_no_trusted_tensors() -> None:
    run = _run()
    assert run.guard.trusted is None
    assert not any(n.startswith("guard_trusted/") for n in run.checkpoint().tensors)
    restored = RunState.open(run.config, run.checkpoint(), None)
    assert restored.guard.trusted is None


def test_a_run_open_to_strangers_starts_blind_without_a_seed_round_or_named_warm_start_holder(
        tmp_path: Path) -> None:
    """serve warns at a fresh start when this is true (coordinator/service.py)."""
    assert not CoordinatorConfig(auth=AuthMode.INVITE, checkpoint_dir=tmp_path).guard_starts_blind  # seeded
    unseeded = GuardConfig(seed_round=False)
    invite = CoordinatorConfig(auth=AuthMode.INVITE, checkpoint_dir=tmp_path, guard=unseeded)
    assert invite.guard_starts_blind  # no seed round, no warm start
    held = PlanConfig(warm_start_steps=30, warm_start_client="mine")
    assert not CoordinatorConfig(auth=AuthMode.INVITE, checkpoint_dir=tmp_path, plan=held,
                                 guard=unseeded).guard_starts_blind
    # a warm start by whoever sends first is no trust anchor
    anyone = PlanConfig(warm_start_steps=30)
    assert CoordinatorConfig(auth=AuthMode.INVITE, checkpoint_dir=tmp_path, plan=anyone,
                             guard=unseeded).guard_starts_blind
    assert not CoordinatorConfig(auth=AuthMode.OPEN, guard=unseeded).guard_starts_blind  # a developer's own
    assert not CoordinatorConfig(auth=AuthMode.INVITE, checkpoint_dir=tmp_path,
                                 guard=GuardConfig(mode="off", seed_round=False)).guard_starts_blind
    assert not CoordinatorConfig(auth=AuthMode.INVITE, checkpoint_dir=tmp_path, guard=unseeded,
                                 outer=OuterConfig(strategy="sync")).guard_starts_blind
