"""The local round: inner lr schedule, LocalTrainer on a tiny regression task, device choice."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import ConfigError
from shared.local_round import InnerConfig, LocalTrainer, pick_device

# --- InnerConfig.lr_at ---------------------------------------------------------------------------


def test_warmup_is_linear_then_flat() -> None:
    inner = InnerConfig(lr=1e-2, warmup_steps=10, schedule_steps=0)
    assert inner.lr_at(0, 0) == pytest.approx(1e-3)
    assert inner.lr_at(4, 0) == pytest.approx(5e-3)
    assert inner.lr_at(9, 0) == pytest.approx(1e-2)
    assert inner.lr_at(10_000, 10**9) == pytest.approx(1e-2)


def test_no_warmup() -> None:
    assert InnerConfig(lr=0.5, warmup_steps=0).lr_at(0, 0) == pytest.approx(0.5)


def test_cosine_reaches_min_at_horizon_and_stays() -> None:
    inner = InnerConfig(lr=1.0, warmup_steps=0, schedule_steps=1000, min_lr_ratio=0.1)
    assert inner.lr_at(0, 0) == pytest.approx(1.0)
    assert inner.lr_at(0, 500) == pytest.approx(0.1 + 0.9 * 0.5)
    assert inner.lr_at(0, 1000) == pytest.approx(0.1)
    assert inner.lr_at(0, 5000) == pytest.approx(0.1)
    lrs = [inner.lr_at(0, g) for g in range(0, 1200, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_warmup_and_cosine_multiply() -> None:
    inner = InnerConfig(lr=1.0, warmup_steps=4, schedule_steps=100, min_lr_ratio=0.2)
    cosine = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert inner.lr_at(1, 25) == pytest.approx(0.5 * cosine)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": -1e-3},
        {"min_lr_ratio": 0.0},
        {"min_lr_ratio": 1.5},
        {"warmup_steps": -1},
        {"schedule_steps": -10},
    ],
)
def test_invalid_inner_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        InnerConfig(**kwargs)


# --- LocalTrainer on a tiny task -----------------------------------------------------------------


class LinearRegressionTask:
    """y = x·w* + b*; a 4→1 linear model; ``loss_sleep_s`` makes each step take measurable time."""

    name = "linreg"
    num_shards = 2
    tokens_per_batch = 32

    def __init__(self, loss_sleep_s: float = 0.0) -> None:
        self.loss_sleep_s = loss_sleep_s
        self.w_true = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def settings_dict(self) -> dict[str, Any]:
        return {"loss_sleep_s": self.loss_sleep_s}

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def _batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8, 4, generator=generator)  # (B, 4)
        return x, x @ self.w_true + 0.25  # (B, 1)

    def train_batches(self, shard: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed * 1000 + shard)
        while True:
            yield self._batch(generator)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.loss_sleep_s:
            time.sleep(self.loss_sleep_s)
        x, y = batch
        return F.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> float:
        x, y = self._batch(torch.Generator().manual_seed(99))
        return float(F.mse_loss(model(x.to(device)), y.to(device)))


def make_trainer(task: LinearRegressionTask | None = None, **inner: Any) -> LocalTrainer:
    torch.manual_seed(0)
    trainer = LocalTrainer(
        task=task or LinearRegressionTask(),
        inner=InnerConfig(**{"lr": 0.05, "warmup_steps": 0, "weight_decay": 0.0, **inner}),
        device=torch.device("cpu"),
        shard=0,
        seed=1,
    )
    base = {name: torch.randn_like(p) for name, p in trainer.model.named_parameters()}
    trainer.load_base(base)
    return trainer


def params_of(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_load_base_sets_params_and_zero_pseudo_gradient() -> None:
    trainer = make_trainer()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), trainer.base[name])
    grads = trainer.pseudo_gradient()
    assert set(grads) == {"weight", "bias"}
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_load_base_copies_its_input() -> None:
    trainer = make_trainer()
    given = {"weight": torch.ones(1, 4), "bias": torch.zeros(1)}
    trainer.load_base(given)
    given["weight"].add_(5)
    assert torch.equal(trainer.base["weight"], torch.ones(1, 4))


def test_load_base_refuses_missing_parameters() -> None:
    trainer = make_trainer()
    with pytest.raises(ConfigError, match="bias"):
        trainer.load_base({"weight": torch.ones(1, 4)})


def test_train_moves_params_and_pseudo_gradient_is_base_minus_local() -> None:
    trainer = make_trainer()
    stats = trainer.train(5)
    assert stats.steps == 5
    assert stats.samples == 5 * 8
    assert stats.tokens == 5 * 8 * 4  # numel of the batch's first tensor
    assert math.isfinite(stats.train_loss) and stats.train_loss > 0
    assert stats.compute_s > 0
    grads = trainer.pseudo_gradient()
    local = params_of(trainer)
    for name in ("weight", "bias"):
        assert torch.count_nonzero(grads[name]) > 0
        assert torch.equal(grads[name], trainer.base[name] - local[name])


def test_reset_to_base_restores() -> None:
    trainer = make_trainer()
    trainer.train(5)
    trainer.reset_to_base()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), trainer.base[name])
    assert all(torch.count_nonzero(g) == 0 for g in trainer.pseudo_gradient().values())


def test_a_rebase_mid_round_carries_the_progress_onto_the_new_base() -> None:
    trainer = make_trainer()
    trainer.train(5)
    progress = {n: p.detach().clone() - trainer.base[n] for n, p in trainer.model.named_parameters()}
    newer = {n: b + 0.25 for n, b in trainer.base.items()}
    state_before = [dict(s) for s in trainer.optimizer.state.values()]
    trainer.rebase(newer)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(trainer.base[name], newer[name])
        assert torch.allclose(param.detach() - trainer.base[name], progress[name], atol=1e-6)
    assert torch.allclose(trainer.pseudo_gradient()["weight"], -progress["weight"], atol=1e-6)
    # the inner optimizer carries on: its step count and moments are kept
    assert [s["step"] for s in trainer.optimizer.state.values()] == [s["step"] for s in state_before]
    newer["weight"].add_(1.0)
    assert not torch.equal(trainer.base["weight"], newer["weight"])  # a copy, not the caller's tensor


def test_what_comes_off_a_base_mid_round_comes_off_the_model_too() -> None:
    trainer = make_trainer()
    trainer.stack_on_base({n: torch.ones_like(b) for n, b in trainer.base.items()}, 0.5)
    trainer.train(3)
    progress = {n: p.detach().clone() - trainer.base[n] for n, p in trainer.model.named_parameters()}
    trainer.unstack_base(carry=True)
    trainer.shift_base("bias", torch.full_like(trainer.base["bias"], 2.0), carry=True)
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(param.detach() - trainer.base[name], progress[name], atol=1e-6)
    assert torch.allclose(trainer.base["weight"], make_trainer().base["weight"], atol=1e-6)


def test_time_between_steps_is_paused_not_compute() -> None:
    trainer = make_trainer()
    calls: list[int] = []

    def between() -> None:
        calls.append(1)
        time.sleep(0.1)

    stats = trainer.train(4, between_steps=between)
    assert len(calls) == 3  # not after the last step: the round is over
    assert stats.paused_s >= 0.3 and stats.compute_s < stats.paused_s


def test_training_lowers_the_loss() -> None:
    trainer = make_trainer()
    task = trainer.task
    before = task.evaluate(trainer.model)
    first = trainer.train(30)
    second = trainer.train(30)
    assert second.train_loss < first.train_loss
    assert task.evaluate(trainer.model) < before / 2


def test_train_sets_the_scheduled_lr_and_counts_own_steps() -> None:
    trainer = make_trainer(warmup_steps=10)
    trainer.train(3, global_step=0)
    assert trainer.own_steps == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 3 / 10)
    trainer.train(2)
    assert trainer.own_steps == 5


def test_should_stop_before_the_first_step() -> None:
    trainer = make_trainer()
    stats = trainer.train(10, should_stop=lambda: True)
    assert stats.steps == 0 and stats.samples == 0
    assert math.isnan(stats.train_loss)
    assert all(torch.count_nonzero(g) == 0 for g in trainer.pseudo_gradient().values())


def test_should_stop_mid_round() -> None:
    trainer = make_trainer()
    stats = trainer.train(10, should_stop=lambda: trainer.own_steps >= 3)
    assert stats.steps == 3


def test_time_budget_stops_after_min_steps() -> None:
    trainer = make_trainer(LinearRegressionTask(loss_sleep_s=0.01))
    stats = trainer.train(100, time_budget_s=0.0, min_steps=4)
    assert stats.steps == 4  # budget already spent, but min_steps run anyway


def test_time_budget_cuts_a_long_round() -> None:
    trainer = make_trainer(LinearRegressionTask(loss_sleep_s=0.01))
    stats = trainer.train(1000, time_budget_s=0.1, min_steps=1)
    assert 1 <= stats.steps < 50
    assert stats.compute_s < 1.0


def test_slowdown_stretches_compute_time() -> None:
    steps = 8
    fast = make_trainer(LinearRegressionTask(loss_sleep_s=0.01)).train(steps, slowdown=1.0)
    slow = make_trainer(LinearRegressionTask(loss_sleep_s=0.01)).train(steps, slowdown=3.0)
    assert fast.steps == slow.steps == steps
    assert slow.compute_s >= 2.5 * fast.compute_s


# --- pick_device ---------------------------------------------------------------------------------


def _no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_pick_device_cpu() -> None:
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_auto_without_accelerators_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    assert pick_device("auto") == torch.device("cpu")


def test_pick_device_auto_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("choice", ["cuda", "mps"])
def test_pick_device_refuses_missing_accelerator(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    _no_accelerators(monkeypatch)
    with pytest.raises(ConfigError, match=choice):
        pick_device(choice)


def test_pick_device_takes_one_gpu_of_several(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="sees 2 CUDA GPU.*cuda:0 to cuda:1"):
        pick_device("cuda:2")
    with pytest.raises(ConfigError, match="GPU number"):
        pick_device("cuda:x")


def test_pick_device_cuda_n_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    with pytest.raises(ConfigError, match="sees 0 CUDA GPU"):
        pick_device("cuda:0")


def test_on_the_cpu_the_round_is_plain_fp32_and_the_pseudo_gradient_is_where_asked() -> None:
    trainer = make_trainer()
    assert trainer.autocast_dtype is None  # bf16 autocast is for GPUs that have it
    assert trainer.optimizer.defaults.get("fused") in (None, False)
    trainer.load_base({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    trainer.train(3)
    on_device = trainer.pseudo_gradient(on_device=True)
    on_host = trainer.pseudo_gradient()
    for name, g in on_host.items():
        assert g.device.type == "cpu" and g.dtype == torch.float32 and bool(g.abs().sum() > 0)
        assert torch.equal(g, on_device[name].cpu())


@pytest.mark.parametrize("choice", ["nonsense", "gpu", ""])
def test_pick_device_refuses_unknown_names(choice: str) -> None:
    with pytest.raises(ConfigError):
        pick_device(choice)


def test_the_attack_harness_forges_the_pseudo_gradient_however_the_client_asks_for_it() -> None:
    from harness.attacker import forge

    trainer = make_trainer()
    trainer.load_base({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    trainer.train(2)
    honest = trainer.pseudo_gradient()
    for how in ({}, {"on_device": True}):  # the worker asks for it on the device
        forged = forge(-10.0)(trainer, **how)
        for name, g in honest.items():
            assert torch.allclose(forged[name].cpu(), -10.0 * g)
