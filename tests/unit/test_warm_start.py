"""Warm start: the run's first steps are one client's ordinary training, then the outer strategy."""

from __future__ import annotations

import msgpack
import pytest
import torch

from coordinator.admission import Arrival
from coordinator.config import CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.intake import DeltaIntake
from coordinator.outer_optimizer import OuterConfig, OuterOptimizer
from coordinator.progress import RunProgress
from coordinator.registry import PlanConfig
from coordinator.warm_start import WarmStart
from shared.errors import ConfigError
from shared.round_plan import RoundMode, RoundPlan
from tests.unit.test_intake import _delta, make_intake


def _rig(until_steps: int = 25, handover_s: float = 30.0) -> tuple[DeltaIntake, OuterOptimizer, WarmStart]:
    params = {"a.weight": torch.ones(4, 3), "b": torch.zeros(5)}
    # DN with ε = 0.5, β = 0.5: distinguishable from the warm start's plain θ -= g
    # the guard off: these made-up deltas are the same size whatever steps they claim, so after the
    # warm start's trusted deltas a short round's would look 3 times too big (test_guard.py has it)
    intake, optimizer = make_intake(params, OuterConfig(strategy="dn", lr=0.5, momentum=0.5, buffer_size=1,
                                                    compute_exponent=0.0), version=5,
                                    warm_start_steps=until_steps, handover_s=handover_s,
                                    guard=GuardConfig(mode="off"))
    warm = next(rule for rule in intake.rules if isinstance(rule, WarmStart))
    return intake, optimizer, warm


def test_the_first_sender_trains_alone_and_its_delta_replaces_theta() -> None:
    intake, optimizer, warm = _rig()
    assert warm.active
    outcome = intake.handle(_delta(client_id="fast", seq=0), now=100.0)  # 10 local steps, g = 0.1
    assert outcome.kind == "applied"
    # θ -= g exactly: no outer lr, no momentum
    torch.testing.assert_close(optimizer.params["a.weight"], torch.full((4, 3), 0.9))
    torch.testing.assert_close(optimizer.params["b"], torch.full((5,), 0.1))
    assert all(float(m.abs().sum()) == 0 for m in optimizer.momentum.values())
    assert warm.current_holder(100.0) == "fast"
    # another client is refused while the holder is training, and nothing moves
    before = {n: p.clone() for n, p in optimizer.params.items()}
    refused = intake.handle(_delta(client_id="slow", seq=0), now=101.0)
    assert (refused.kind, refused.reason) == ("rejected", "warming_up")
    assert all(torch.equal(optimizer.params[n], t) for n, t in before.items())


def test_during_the_warm_start_only_deltas_on_the_current_version_count() -> None:
    intake, optimizer, warm = _rig()
    assert intake.handle(_delta(client_id="fast", seq=0), now=100.0).kind == "applied"
    intake.take_version(6)
    stale = intake.handle(_delta(client_id="fast", seq=1, base_version=5), now=101.0)
    assert (stale.kind, stale.reason) == ("rejected", "stale")  # 1 behind: ordinary training is serial


def test_a_quiet_holder_hands_over_to_the_next_client() -> None:
    intake, optimizer, warm = _rig(handover_s=30.0)
    assert intake.handle(_delta(client_id="fast", seq=0), now=100.0).kind == "applied"
    intake.take_version(6)
    assert warm.current_holder(131.0) == ""
    outcome = intake.handle(_delta(client_id="slow", seq=0, base_version=6), now=131.0)
    assert outcome.kind == "applied" and warm.current_holder(131.0) == "slow"


def test_after_the_warm_steps_the_outer_strategy_takes_over() -> None:
    intake, optimizer, warm = _rig(until_steps=20)
    for seq in range(2):  # 2 × 10 local steps
        body = _delta(client_id="fast", seq=seq, base_version=intake.version)
        assert intake.handle(body, now=100.0 + seq).kind == "applied"
        intake.take_version(intake.version + 1)
    assert not warm.active
    torch.testing.assert_close(optimizer.params["b"], torch.full((5,), 0.2))
    # now DN (N = 1, ε = 0.5, β = 0.5): m = g; θ -= ε(β·m + g) = 0.75·g, and anyone may send
    body = _delta(client_id="slow", seq=0, base_version=intake.version)
    assert intake.handle(body, now=103.0).kind == "applied"
    torch.testing.assert_close(optimizer.params["b"], torch.full((5,), 0.2 + 0.075))  # g_b = -0.1
    torch.testing.assert_close(optimizer.momentum["b"], torch.full((5,), -0.1))


def test_warm_start_state_survives_a_checkpoint_round_trip() -> None:
    warm = WarmStart(100, progress=RunProgress())
    warm.admitted(Arrival(client_id="fast", seq=0, base_version=0, staleness=0, local_steps=5, now=123.0))
    restored = WarmStart(100, progress=RunProgress())
    restored.load_state(warm.save_state())
    assert (restored.holder, restored.holder_seen) == ("fast", 123.0)


def test_the_plan_carries_the_warm_start_and_a_plan_without_a_holder_decodes() -> None:
    plan = RoundPlan(run_id="r", local_steps=20, min_local_steps=2, fastest_steps_per_s=3.0,
                     active_clients=1, mode=RoundMode.WARM_START, warm_client="fast")
    assert RoundPlan.decode(plan.encode()) == plan
    fields = msgpack.unpackb(plan.encode())
    del fields["warm_client"]
    fields["mode"] = "dylu"
    plain = RoundPlan.decode(msgpack.packb(fields))
    assert (plain.mode, plain.warm_client, plain.local_steps) == (RoundMode.DYLU, "", 20)


def test_the_warm_start_is_refused_with_the_sync_strategy() -> None:
    with pytest.raises(ConfigError, match="asynchronous strategies"):
        CoordinatorConfig(auth=AuthMode.OPEN, outer=OuterConfig(strategy="sync"),
                          plan=PlanConfig(warm_start_steps=10))
    config = CoordinatorConfig(auth=AuthMode.OPEN, plan=PlanConfig(warm_start_steps=10))
    assert config.plan.warm_start_steps == 10
