"""The simulator's lying volunteers: what each attack sends, and the guard stopping them in a run."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.guard import GuardConfig
from coordinator.outer_optimizer import OuterConfig
from coordinator.sim.attacks import PAYLOAD, TRIGGER, AttackConfig, Forger, backdoor_batches
from coordinator.sim.simulator import SimConfig, Simulation
from shared.errors import ConfigError
from shared.local_round import InnerConfig
from tests.unit.test_local_round import LinearRegressionTask


def _d(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.norm()) ** 2 for t in delta.values()))


def test_each_attack_forges_what_it_says() -> None:
    honest = _d(1.0, -2.0, 2.0)
    assert torch.equal(Forger(AttackConfig("scale", 1, 10.0), seed=0).forge(honest, passing_norm=None)["w"],
                       honest["w"] * 10)
    assert torch.equal(Forger(AttackConfig("signflip", 1, 1.0), seed=0).forge(honest, passing_norm=None)["w"],
                       -honest["w"])
    most = Forger(AttackConfig("scale_max", 1), seed=0).forge(honest, passing_norm=30.0)
    assert _norm(most) == pytest.approx(0.99 * 30.0)
    noisy = Forger(AttackConfig("noise", 1, 3.0), seed=0)
    noisy.saw_honest(_d(0.0, 0.0, 2.0))
    assert _norm(noisy.forge(honest, passing_norm=None)) == pytest.approx(6.0, rel=1e-4)
    for kind, k in (("alie", 1.0), ("ipm", 0.5)):
        forger = Forger(AttackConfig(kind, 1, k), seed=0)
        forger.saw_honest(_d(3.0, 0.0, 0.0))
        forged = forger.forge(_d(1.0, 2.0, 0.0), passing_norm=None)["w"]
        if kind == "alie":  # mean − k·std per coordinate of (3, 0, 0) and (1, 2, 0)
            assert torch.allclose(forged, torch.tensor([2.0 - 1.0, 1.0 - 1.0, 0.0]))
        else:  # −k × the mean honest delta
            assert torch.allclose(forged, torch.tensor([-1.0, -0.5, 0.0]))
    assert Forger(AttackConfig("base_lie", 1), seed=0).forge(honest, passing_norm=None) is honest
    with pytest.raises(ConfigError):
        AttackConfig("gossip", 1)
    with pytest.raises(ConfigError):
        AttackConfig("", 1)  # attackers without an attack


def test_a_backdoor_stream_carries_the_trigger_and_its_payload() -> None:
    clean = iter([torch.zeros(4, 40, dtype=torch.long)] * 3)
    stamp = torch.tensor(list(TRIGGER + PAYLOAD))
    for batch in backdoor_batches(clean, rate=1.0, seed=0):
        for row in batch:
            found = [i for i in range(len(row) - len(stamp) + 1) if torch.equal(row[i:i + len(stamp)], stamp)]
            assert len(found) == 1


def _config(**kwargs: object) -> SimConfig:
    base = dict(strategy="edn", speeds=(1.0, 1.0, 1.0, 1.0), local_steps=8, min_local_steps=1,
                budget_steps=192, eval_every_steps=48, codec="fp32", max_norm_ratio=1e9,
                inner=InnerConfig(lr=0.05, warmup_steps=0, weight_decay=0.0),
                outer=OuterConfig(lr=0.7, momentum=0.5), warm_start_steps=16, jitter=0.2)
    base.update(kwargs)
    return SimConfig(**base)  # type: ignore[arg-type]


def test_the_guard_stops_a_sign_flipping_worker_that_wrecks_an_unguarded_run() -> None:
    sim = Simulation(LinearRegressionTask())
    liar = AttackConfig("signflip", attackers=1, scale=10.0)
    clean = sim.run(_config())
    attacked_off = sim.run(_config(attack=liar, guard=GuardConfig(mode="off")))
    attacked_on = sim.run(_config(attack=liar))
    counts = attacked_on.guard_counts
    # the forged deltas are refused (the first may pass while the statistics fill), honest ones not
    assert counts["attack_refused"] >= counts["attack_judged"] - 1 > 0
    assert counts.get("honest_refused", 0) == 0
    assert attacked_off.final_loss > 2 * clean.final_loss
    assert attacked_on.final_loss < 1.5 * clean.final_loss
    # the budget counts honest steps: the attacker's do not stand in for them
    assert attacked_on.curve[-1].local_steps == clean.curve[-1].local_steps
    assert attacked_on.steps_per_worker[0] > 0
