"""Dynamic Local Updates: per-client step counts (the coordinator's assignments, or the client's own
speed), the round time budget, the speed EMA, and the plan's assignments on the wire."""

from __future__ import annotations

import msgpack
import pytest

from shared import dylu
from shared.dylu import SpeedMeter, is_assigned, round_time_budget_s
from shared.errors import ProtocolError
from shared.round_plan import (
    PLAN_MAX_ARRIVAL_SHARE,
    PLAN_MAX_ASSIGNMENTS,
    PLAN_MAX_BYTES,
    RoundMode,
    RoundPlan,
)


def plan(
    *,
    local_steps: int = 100,
    min_local_steps: int = 10,
    fastest: float = 20.0,
    mode: RoundMode = RoundMode.DYLU,
    assignments: dict[str, int] | None = None,
    arrival_share: float = 0.0,
) -> RoundPlan:
    return RoundPlan(
        arrival_share=arrival_share,
        run_id="r",
        local_steps=local_steps,
        min_local_steps=min_local_steps,
        fastest_steps_per_s=fastest,
        active_clients=3,
        mode=mode,
        assignments=assignments or {},
    )


def local_steps_for(p: RoundPlan, speed: float | None) -> int:
    """Client "c1"'s steps by its own speed: the rule for a plan that assigns nobody (the simulator's)."""
    return dylu.local_steps_for(p, "c1", speed)


def test_fastest_client_runs_h() -> None:
    assert local_steps_for(plan(), 20.0) == 100


@pytest.mark.parametrize(("local_steps", "expected"), [(100, 50), (101, 50), (7, 3)])
def test_half_speed_runs_floor_of_half(local_steps: int, expected: int) -> None:
    assert local_steps_for(plan(local_steps=local_steps, min_local_steps=1), 10.0) == expected


def test_proportional_in_between() -> None:
    assert local_steps_for(plan(), 15.0) == 75
    assert local_steps_for(plan(), 3.0) == 15


def test_very_slow_client_clamps_to_h_min() -> None:
    assert local_steps_for(plan(min_local_steps=10), 0.2) == 10
    assert local_steps_for(plan(min_local_steps=1), 0.001) == 1


@pytest.mark.parametrize("mode", [RoundMode.FIXED, RoundMode.SYNC, RoundMode.WARM_START])
def test_outside_dylu_everybody_runs_h_whatever_the_speed(mode: RoundMode) -> None:
    assert local_steps_for(plan(mode=mode), 1.0) == 100
    assert round_time_budget_s(plan(mode=mode)) is None


@pytest.mark.parametrize("speed", [None, 0.0])
def test_unknown_own_speed_runs_h(speed: float | None) -> None:
    assert local_steps_for(plan(), speed) == 100


def test_no_fastest_speed_yet_runs_h() -> None:
    assert local_steps_for(plan(fastest=0.0), 5.0) == 100


def test_faster_than_the_fastest_runs_h() -> None:
    assert local_steps_for(plan(), 80.0) == 100


def test_round_time_budget() -> None:
    assert round_time_budget_s(plan(local_steps=100, fastest=20.0)) == pytest.approx(5.0)
    assert round_time_budget_s(plan(fastest=0.0)) is None
    assert round_time_budget_s(plan(mode=RoundMode.FIXED)) is None


def test_steps_at_own_speed_fill_the_budget() -> None:
    # the point of DyLU: every client's round takes about the same wall time
    p = plan(local_steps=200, min_local_steps=1, fastest=40.0)
    budget = round_time_budget_s(p)
    assert budget is not None
    for speed in (40.0, 25.0, 8.0):
        assert local_steps_for(p, speed) / speed == pytest.approx(budget, abs=1 / speed)


def test_speed_meter_first_measurement_is_taken_as_is() -> None:
    meter = SpeedMeter(alpha=0.25)
    assert meter.steps_per_s is None
    assert meter.update(50, 10.0) == pytest.approx(5.0)


def test_speed_meter_ema() -> None:
    meter = SpeedMeter(alpha=0.25)
    meter.update(50, 10.0)  # 5 steps/s
    assert meter.update(90, 10.0) == pytest.approx(0.25 * 9.0 + 0.75 * 5.0)  # 6.0
    assert meter.update(10, 10.0) == pytest.approx(0.25 * 1.0 + 0.75 * 6.0)  # 4.75
    assert meter.steps_per_s == pytest.approx(4.75)


@pytest.mark.parametrize(("steps", "seconds"), [(0, 1.0), (10, 0.0), (-3, 1.0), (10, -1.0)])
def test_speed_meter_ignores_empty_rounds(steps: int, seconds: float) -> None:
    meter = SpeedMeter()
    assert meter.update(steps, seconds) is None
    meter.update(20, 2.0)
    assert meter.update(steps, seconds) == pytest.approx(10.0)


# ------------------------------------------------------------------ the coordinator's assignments


def test_an_assigned_client_runs_its_assignment_whatever_its_own_speed() -> None:
    p = plan(assignments={"c1": 40, "c2": 100})
    assert dylu.local_steps_for(p, "c1", 20.0) == 40  # its own speed would say 100
    assert dylu.local_steps_for(p, "c1", None) == 40
    assert dylu.local_steps_for(p, "c2", 0.5) == 100  # its own speed would say H_min
    assert is_assigned(p, "c1") and not is_assigned(p, "c3")


def test_a_client_the_plan_does_not_name_runs_h_even_if_it_thinks_itself_slow() -> None:
    p = plan(assignments={"c2": 40})
    assert dylu.local_steps_for(p, "c1", 0.5) == 100  # new to the coordinator: H, cut by the budget
    assert round_time_budget_s(p) == pytest.approx(5.0)


@pytest.mark.parametrize("mode", [RoundMode.FIXED, RoundMode.SYNC, RoundMode.WARM_START])
def test_assignments_count_only_in_dylu_mode(mode: RoundMode) -> None:
    p = plan(mode=mode, assignments={"c1": 40})
    assert dylu.local_steps_for(p, "c1", 1.0) == 100
    assert not is_assigned(p, "c1")


@pytest.mark.parametrize(("speed", "fastest", "expected"),
                         [(20.0, 20.0, 100), (10.0, 20.0, 50), (0.1, 20.0, 10), (40.0, 20.0, 100),
                          (0.0, 20.0, 100), (5.0, 0.0, 100)])
def test_the_dylu_rule(speed: float, fastest: float, expected: int) -> None:
    assert dylu.dylu_steps(speed, fastest, 100, 10) == expected


# ------------------------------------------------------------------ the plan on the wire


def test_assignments_travel_in_the_plan_and_a_full_one_stays_compact() -> None:
    p = plan(assignments={f"{i:064d}": 10 + i % 90 for i in range(PLAN_MAX_ASSIGNMENTS)})
    encoded = p.encode()
    assert len(encoded) <= PLAN_MAX_BYTES
    assert RoundPlan.decode(encoded) == p
    assert RoundPlan.decode(plan().encode()).assignments == {}


def test_a_plan_without_assignments_decodes() -> None:
    fields = msgpack.unpackb(plan().encode())
    del fields["assignments"]
    assert RoundPlan.decode(msgpack.packb(fields)).assignments == {}


@pytest.mark.parametrize("assignments", [
    {"c1": 5},  # below min_local_steps
    {"c1": 101},  # above H
    {"c1": True},
    {"c1": 1.5},
    {"": 20},
    {"x" * 65: 20},
    [1, 2],
    {f"c{i}": 20 for i in range(PLAN_MAX_ASSIGNMENTS + 1)},
])
def test_a_plan_with_bad_assignments_is_refused(assignments: object) -> None:
    fields = msgpack.unpackb(plan().encode())
    fields["assignments"] = assignments
    with pytest.raises(ProtocolError):
        RoundPlan.decode(msgpack.packb(fields))


def test_the_arrival_share_travels_in_the_plan_within_bounds() -> None:
    assert RoundPlan.decode(plan(arrival_share=0.45).encode()).arrival_share == 0.45
    fields = msgpack.unpackb(plan().encode())
    del fields["arrival_share"]
    assert RoundPlan.decode(msgpack.packb(fields)).arrival_share == 0.0  # none said: no stacking
    for bad in (-0.1, PLAN_MAX_ARRIVAL_SHARE + 0.1, float("nan"), float("inf"), "0.5", True):
        fields["arrival_share"] = bad
        with pytest.raises(ProtocolError):
            RoundPlan.decode(msgpack.packb(fields))


# ------------------------------------------------------------------ how a round ends


def test_a_named_client_runs_exactly_its_assignment_without_a_time_budget() -> None:
    assert dylu.round_length(plan(assignments={"c1": 40}), "c1", 0.5) == (40, 40, None)


def test_a_client_new_to_the_coordinator_runs_h_cut_by_the_round_budget_after_h_min() -> None:
    steps, min_steps, budget_s = dylu.round_length(plan(assignments={"c2": 40}), "c1", 0.5)
    assert (steps, min_steps) == (100, 10) and budget_s == pytest.approx(5.0)
    # nothing measured anywhere yet: the same, with no budget to cut by
    assert dylu.round_length(plan(fastest=0.0), "c1", None) == (100, 10, None)


@pytest.mark.parametrize("mode", [RoundMode.FIXED, RoundMode.SYNC, RoundMode.WARM_START])
def test_outside_dylu_every_round_runs_h_exactly(mode: RoundMode) -> None:
    assert dylu.round_length(plan(mode=mode, assignments={"c1": 40}), "c1", 1.0) == (100, 100, None)
