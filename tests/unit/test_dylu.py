"""Dynamic Local Updates: per-client step counts, the round time budget, the speed EMA."""

from __future__ import annotations

import pytest

from shared.dylu import SpeedMeter, local_steps_for, round_time_budget_s
from shared.protocol import RoundMode, RoundPlan


def plan(
    *,
    local_steps: int = 100,
    min_local_steps: int = 10,
    fastest: float = 20.0,
    mode: RoundMode = RoundMode.DYLU,
) -> RoundPlan:
    return RoundPlan(
        run_id="r",
        local_steps=local_steps,
        min_local_steps=min_local_steps,
        fastest_steps_per_s=fastest,
        active_clients=3,
        mode=mode,
    )


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
