"""The guard's descent check: a delta is tried on the operator's own data before it moves θ."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from coordinator.descent import DescentCheck
from coordinator.guard import DeltaGuard, GuardConfig
from coordinator.sim.attacks import AttackConfig
from coordinator.sim.simulator import Simulation
from tests.unit.test_attacks import _config
from tests.unit.test_local_round import LinearRegressionTask


def _check(tolerance: float = 0.0) -> tuple[DescentCheck, dict[str, torch.Tensor]]:
    task = LinearRegressionTask()
    model = task.build_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, param in model.named_parameters():  # as the coordinator's evaluation model: θ itself
        param.data = params[name]
    return DescentCheck(task, model, params, step_share=lambda: 0.1, tolerance=tolerance, seed=3), params


def _descent_direction(task: LinearRegressionTask,
                       params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full-batch gradient at θ: a delta (θ −= γ·g) that lowers the loss."""
    model = task.build_model()
    model.load_state_dict(params)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(5))
    loss = torch.nn.functional.mse_loss(model(x), x @ task.w_true + 0.25)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]


def test_a_delta_that_lowers_the_trusted_loss_passes_and_its_opposite_is_refused() -> None:
    check, params = _check()
    good = _descent_direction(check.task, params)
    before = {n: t.clone() for n, t in params.items()}
    assert check(good) is None
    why = check({n: -g for n, g in good.items()})
    assert why is not None and "trusted loss rose" in why
    for name, tensor in params.items():  # θ itself is never touched by the check
        assert torch.equal(tensor, before[name])


def test_the_tolerance_lets_a_small_rise_through() -> None:
    strict, params = _check(tolerance=0.0)
    loose, _ = _check(tolerance=10.0)
    loose.params = params
    bad = {n: -0.01 * g for n, g in _descent_direction(strict.task, params).items()}
    assert strict(bad) is not None and loose(bad) is None


def test_the_strict_trial_refuses_any_rise_whatever_the_check_s_tolerance() -> None:
    """DescentCheck.strict (the guard's trial of a delta its direction check cannot vouch for)
    holds it to no rise at all, where the every-k-th check's own tolerance would let a small rise
    through."""
    loose, params = _check(tolerance=10.0)
    good = _descent_direction(loose.task, params)
    bad = {n: -0.01 * g for n, g in good.items()}
    assert loose(bad) is None
    why = loose.strict(bad)
    assert why is not None and "tolerance 0%" in why
    assert loose.strict(good) is None


def test_a_trial_without_the_every_kth_check_frees_its_copy_of_the_model() -> None:
    """The coordinator's steady memory holds no second model for distrust's rare trials."""
    kept, params = _check()
    freed = DescentCheck(kept.task, kept.template, params, step_share=lambda: 0.1, tolerance=0.0,
                         seed=3, keep_model=False)
    good = _descent_direction(kept.task, params)
    assert kept.strict(good) is None and freed.strict(good) is None
    assert kept._model is not None and freed._model is None


class ProductTask:
    """The loss (1 − a·b)², whatever the batch: near a = b = 0 it falls both ways along (1, 1),
    as the tiny model's fell both ways along a flipped delta at a real run's start."""

    num_shards = 1

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        model.a = torch.nn.Parameter(torch.tensor(0.1))
        model.b = torch.nn.Parameter(torch.tensor(0.1))
        return model

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return (1 - model.a * model.b) ** 2

    def train_batches(self, shard: int, seed: int) -> Iterator[torch.Tensor]:
        while True:
            yield torch.zeros(1)


def test_the_strict_trial_refuses_a_flipped_delta_even_where_the_loss_falls_both_ways() -> None:
    task = ProductTask()
    model = task.build_model()
    params = dict(model.named_parameters())
    check = DescentCheck(task, model, {n: p.detach() for n, p in params.items()}, step_share=lambda: 1.0,
                         tolerance=0.0, seed=1)
    honest = {"a": torch.tensor(-0.5), "b": torch.tensor(-0.5)}  # θ − γ·g: a = b = 0.6, loss 0.41
    flipped = {n: -g for n, g in honest.items()}  # a = b = −0.4: loss 0.71, below the 0.98 at θ
    assert check(flipped) is None  # it lowers the loss: the plain check lets it through
    why = check.strict(flipped)
    assert why is not None and "than along its opposite" in why
    assert check.strict(honest) is None


def test_the_guard_checks_every_kth_passing_delta_and_counts_it() -> None:
    calls: list[int] = []

    def descent(delta: dict[str, torch.Tensor]) -> str | None:
        calls.append(1)
        return "rose" if len(calls) == 2 else None

    guard = DeltaGuard(GuardConfig(descent_every=2), ["w"], full_steps=1, descent=descent)
    verdicts = [guard.judge({"w": torch.ones(3)}, local_steps=1, sender=f"c{i}").reason for i in range(4)]
    assert verdicts == ["", "", "", "no_descent"] and len(calls) == 2
    assert guard.counts["descent_checked"] == 2 and guard.counts["no_descent"] == 1
    off = DeltaGuard(GuardConfig(), ["w"], full_steps=1, descent=descent)  # descent_every 0: never asked
    off.judge({"w": torch.ones(3)}, local_steps=1)
    assert len(calls) == 2


def test_in_the_simulator_it_refuses_a_sign_flipper_that_the_other_rules_let_through() -> None:
    sim = Simulation(LinearRegressionTask())
    liar = AttackConfig("signflip", attackers=1, scale=1.0)
    # screening without the direction check, no clipping: only the descent check can stop it
    blind = GuardConfig(mode="screen", min_cosine=-1.0, strikes=0)
    without = sim.run(_config(attack=liar, guard=blind))
    with_check = sim.run(_config(attack=liar, guard=GuardConfig(mode="screen", min_cosine=-1.0, strikes=0,
                                                                 descent_every=1)))
    assert without.guard_counts.get("attack_refused", 0) <= 1
    counts = with_check.guard_counts
    assert counts["attack_refused"] >= counts["attack_judged"] - 1 > 0
    assert counts.get("honest_refused", 0) <= counts["honest_judged"] // 10
    assert with_check.final_loss < without.final_loss
