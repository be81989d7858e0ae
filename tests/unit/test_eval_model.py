"""The coordinator's evaluation model holds θ itself on the CPU (one copy of the model less), and
evaluates exactly θ: after outer steps, after a restore from a checkpoint, and beside the descent
check, which tries deltas on a copy of its own."""

from __future__ import annotations

import torch

from coordinator.checkpoint import Checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.run_state import RunState, new_run_config

TASK = {"model_size": "tiny", "max_corpus_bytes": 200_000, "eval_sequences": 2, "batch_size": 2}


def _run(checkpoint: Checkpoint | None = None) -> RunState:
    config = CoordinatorConfig(auth=AuthMode.OPEN, task_settings=TASK, guard=GuardConfig(descent_every=1))
    if checkpoint is not None:
        return RunState.open(config, checkpoint, None)
    return RunState(config, run_id="r-1", run_config=new_run_config(config), applied_log=None)


def _loss_of(run: RunState, theta: dict[str, torch.Tensor]) -> float:
    """The eval loss of a model of its own loaded with ``theta``."""
    model = run.task.build_model()
    model.load_state_dict(theta)
    return float(run.task.evaluate(model, "cpu"))


def _step(run: RunState) -> None:
    torch.manual_seed(1)
    run.optimizer.step({n: 0.01 * torch.randn_like(p) for n, p in run.optimizer.params.items()},
                       active_clients=1)


def test_the_eval_model_is_theta_and_evaluates_it_after_outer_steps() -> None:
    run = _run()
    for name, param in run.eval_model.named_parameters():
        assert param.data_ptr() == run.optimizer.params[name].data_ptr()
    before = {n: t.clone() for n, t in run.optimizer.params.items()}
    _step(run)
    assert any(not torch.equal(before[n], t) for n, t in run.optimizer.params.items())
    theta = {n: t.clone() for n, t in run.optimizer.params.items()}
    assert run.evaluate() == _loss_of(run, theta)
    assert all(torch.equal(theta[n], t) for n, t in run.optimizer.params.items())  # eval moved nothing


def test_a_restored_run_still_shares_theta_and_evaluates_the_checkpoints() -> None:
    run = _run()
    _step(run)
    saved = run.checkpoint()
    restored = _run(saved)
    for name, param in restored.eval_model.named_parameters():
        assert param.data_ptr() == restored.optimizer.params[name].data_ptr()
        assert torch.equal(param, run.optimizer.params[name])
    assert restored.evaluate() == run.evaluate()


def test_the_descent_check_never_moves_theta() -> None:
    run = _run()
    theta = {n: t.clone() for n, t in run.optimizer.params.items()}
    delta = {n: torch.ones_like(t) for n, t in theta.items()}  # a big move, tried and undone
    assert run.guard.descent is not None
    assert run.guard.descent(delta) is not None  # refused: the trusted loss rose along it
    assert all(torch.equal(theta[n], t) for n, t in run.optimizer.params.items())
    assert run.evaluate() == _loss_of(run, theta)
