"""Admission rules that keep a stranger's claims from steering the run: local steps within the
assignment, one delta per base version, a rate limit per client, the operator's warm-start holder;
and the ``serve`` options that set them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from coordinator.admission import (
    RATE_BURST_DELTAS,
    RATE_DELTAS_PER_MINUTE,
    Arrival,
    AssignmentBound,
    OnePerBase,
    RateLimit,
    steps_allowed,
)
from coordinator.config import CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.intake import DeltaIntake, IntakeConfig
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry, PlanConfig
from coordinator.run_state import admission_rules, build_intake
from coordinator.sync_round import SyncBarrier
from coordinator.warm_start import WarmStart
from shared.errors import ConfigError
from shared.round_plan import RoundMode
from tests.services import FakeCoordinator
from tests.unit.test_coordinator_cli import assert_one_line_error, invoke
from tests.unit.test_intake import RUN_ID, _delta

H = 30


def rig(*, intake: IntakeConfig | None = None, plan: PlanConfig | None = None,
        version: int = 5) -> tuple[DeltaIntake, WarmStart]:
    """An intake wired as a run wires it: every admission rule, a registry, a warm start."""
    # The rules alone: the deltas here are made up, of any size (the guard: test_guard.py).
    config = CoordinatorConfig(auth=AuthMode.OPEN, intake=intake or IntakeConfig(),
                               outer=OuterConfig(lr=0.01, momentum=0.0, buffer_size=1, compute_exponent=0.0),
                               plan=plan or PlanConfig(local_steps=H, min_local_steps=3),
                               guard=GuardConfig(mode="off"))
    optimizer = make_outer_optimizer({"a.weight": torch.ones(4, 3), "b": torch.zeros(5)}, config.outer)
    progress = RunProgress()
    warm = WarmStart(config.plan.warm_start_steps, progress=progress,
                     holder=config.plan.warm_start_client)
    handler = build_intake(config, optimizer=optimizer, registry=ClientRegistry(config.plan),
                           progress=progress, warm=warm, barrier=None, run_id=RUN_ID)
    handler.take_version(version)
    return handler, warm


def params_of(intake: DeltaIntake) -> dict[str, torch.Tensor]:
    return {name: p.clone() for name, p in intake.params.items()}


def unchanged(intake: DeltaIntake, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(intake.params[name], tensor) for name, tensor in before.items())


# ------------------------------------------------------------------ local steps within the assignment


def test_a_million_local_steps_is_refused_and_credits_nothing() -> None:
    intake, _ = rig()
    assert intake.handle(_delta(seq=0, base_version=4), now=100.0).kind == "applied"
    record = intake.registry.clients["c1"]
    progress, steps, before = intake.progress.as_dict(), record.local_steps, params_of(intake)
    outcome = intake.handle(_delta(seq=1, local_steps=1_000_000, tokens=10**12), now=101.0)
    assert (outcome.kind, outcome.reason) == ("rejected", "over_assignment")
    assert "1000000" in outcome.detail
    assert intake.progress.as_dict() == progress and record.local_steps == steps  # nothing credited
    assert unchanged(intake, before) and intake.rejected_by_reason == {"over_assignment": 1}


def test_a_stranger_may_claim_h_with_slack_and_no_more() -> None:
    assert steps_allowed(H) == 38 and steps_allowed(4) == 6  # ×1.25 + 1
    intake, _ = rig()
    assert intake.handle(_delta(client_id="a", local_steps=39), now=100.0).reason == "over_assignment"
    assert intake.handle(_delta(client_id="b", local_steps=38), now=100.0).kind == "applied"
    assert intake.registry.clients["b"].local_steps == H  # applied, credited H


def measured_fast_and_slow() -> DeltaIntake:
    """Versions 3 and 4 published at 10 s and 20 s; on each, "fast" sent 30 steps and "slow" 5,
    so that the next plan measures fast at 15 steps/s and slow at 0.5."""
    intake, _ = rig()
    intake.registry.note_published(3, at=10.0)
    intake.registry.note_published(4, at=20.0)
    for cid, steps, arrive in (("fast", 30, (15.0, 22.0)), ("slow", 5, (15.0, 30.0))):
        for seq, (base, now) in enumerate(zip((3, 4), arrive, strict=True)):
            assert intake.handle(_delta(client_id=cid, seq=seq, base_version=base, local_steps=steps),
                                 now=now).kind == "applied"
    return intake


def test_a_measured_client_may_claim_its_own_assignment_with_slack() -> None:
    intake = measured_fast_and_slow()
    reg = intake.registry
    plan = reg.plan(RUN_ID, 40.0, RoundMode.DYLU)  # fast 15 steps/s, slow 0.5 steps/s
    assert plan.assignments == {"fast": 30, "slow": 3}  # floor(0.5 / 15 · 30) = 1 → H_min 3
    reg.note_published(5, at=60.0)  # no plan since 40 s: slow was offered 3 for this base
    assert AssignmentBound(reg).refuse(Arrival("slow", 9, 5, 0, 4, 70.0)) is None  # 3 × 1.25 + 1 = 4
    refused = intake.handle(_delta(client_id="slow", seq=2, base_version=5, local_steps=6), now=70.0)
    assert (refused.reason, intake.version) == ("over_assignment", 5)
    ok = intake.handle(_delta(client_id="slow", seq=3, base_version=5, local_steps=4), now=71.0)
    assert ok.kind == "applied" and reg.clients["slow"].last_round_steps == 3  # credited its 3



def test_a_round_that_moved_is_bounded_by_the_plans_from_the_version_it_began_on() -> None:
    """--follow: a slow client's round began on version 3 with H (the plans did not name it yet)
    and ended on version 5, after a plan cut it to 3 steps. Counted from version 5 it would be
    refused; from version 3, which it names (origin_version), it is taken and credited in full.
    Naming an origin can widen the window, never past H's bound."""
    intake = measured_fast_and_slow()
    reg = intake.registry
    assert reg.plan(RUN_ID, 40.0, RoundMode.DYLU).assignments["slow"] == 3
    reg.note_published(5, at=60.0)
    assert AssignmentBound(reg).refuse(Arrival("slow", 2, 5, 0, 20, 70.0)) is not None  # from 5: 3 steps
    assert AssignmentBound(reg).refuse(Arrival("slow", 2, 5, 0, 20, 70.0, origin_version=3)) is None
    moved = intake.handle(_delta(client_id="slow", seq=2, base_version=5, local_steps=20, origin_version=3),
                          now=70.0)
    assert moved.kind == "applied" and reg.clients["slow"].last_round_steps == 20
    # an origin at or past the base changes nothing; H's bound holds whatever the claim
    assert AssignmentBound(reg).refuse(Arrival("slow", 3, 5, 0, 20, 71.0, origin_version=7)) is not None
    assert AssignmentBound(reg).refuse(Arrival("slow", 3, 5, 0, 40, 71.0, origin_version=0)) is not None


# ------------------------------------------------------------------ one delta per base


def test_a_second_delta_on_the_same_base_is_refused_already_sent() -> None:
    intake, _ = rig()
    assert intake.handle(_delta(seq=0, base_version=5), now=100.0).kind == "applied"
    before = params_of(intake)
    again = intake.handle(_delta(seq=1, base_version=5), now=101.0)
    assert (again.kind, again.reason) == ("rejected", "already_sent")
    older = intake.handle(_delta(seq=2, base_version=4), now=102.0)
    assert older.reason == "already_sent" and unchanged(intake, before)
    assert intake.registry.clients["c1"].updates == 1
    intake.take_version(6)
    assert intake.handle(_delta(seq=3, base_version=6), now=103.0).kind == "applied"
    assert intake.handle(_delta(client_id="c2", seq=0, base_version=5), now=104.0).kind == "applied"


def test_a_delta_stacked_on_the_last_applied_one_may_share_its_base() -> None:
    """--overlap: a round started from base 5 moved by the client's own delta 0 (not yet in a
    snapshot) holds new work only; naming delta 0 it is taken on base 5, once per predecessor."""
    intake, _ = rig()
    assert intake.handle(_delta(seq=0, base_version=5), now=100.0).kind == "applied"
    assert intake.handle(_delta(seq=1, base_version=5, stacked_on=0), now=101.0).kind == "applied"
    assert intake.handle(_delta(seq=2, base_version=5, stacked_on=1), now=102.0).kind == "applied"
    for seq, stacked_on, base in ((3, 1, 5),  # not on its newest applied delta: a repeat of 2's work
                                  (4, 2, 4),  # on an older base than that delta's
                                  (5, -1, 5)):  # stacked on nothing
        refused = intake.handle(_delta(seq=seq, base_version=base, stacked_on=stacked_on), now=103.0)
        assert refused.reason == "already_sent", (seq, refused)
    wrong = intake.handle(_delta(seq=6, base_version=5, stacked_on=1), now=104.0)
    assert "stacked on 1, not 2" in wrong.detail
    intake.take_version(6)
    assert intake.handle(_delta(seq=7, base_version=6, stacked_on=2), now=105.0).kind == "applied"


def test_a_rejected_delta_does_not_use_up_its_base() -> None:
    intake, _ = rig()
    too_big = _delta(seq=0, tensors={"a.weight": torch.full((12,), 1e3).numpy().tobytes(), "b": b"\0" * 20})
    assert intake.handle(too_big, now=100.0).reason == "norm_too_large"
    assert intake.handle(_delta(seq=1, base_version=5), now=101.0).kind == "applied"


def test_a_sync_run_keeps_its_own_one_per_round_rule() -> None:
    config = CoordinatorConfig(auth=AuthMode.OPEN, outer=OuterConfig(strategy="sync"))
    reg = ClientRegistry(config.plan)
    barrier = SyncBarrier(reg)
    rules = admission_rules(config, barrier=barrier, warm=WarmStart(0, progress=RunProgress()), registry=reg)
    assert barrier in rules and not any(isinstance(r, (OnePerBase, WarmStart)) for r in rules)
    async_rules = admission_rules(CoordinatorConfig(auth=AuthMode.OPEN), barrier=None,
                                  warm=WarmStart(0, progress=RunProgress()), registry=reg)
    assert [type(r).__name__ for r in async_rules] == [
        "RateLimit", "WarmStart", "OnePerBase", "StalenessBound", "LocalStepsBound", "AssignmentBound"]


# ------------------------------------------------------------------ the rate limit


def test_a_burst_over_the_rate_is_rate_limited() -> None:
    intake, _ = rig(intake=IntakeConfig(max_staleness=10_000))
    outcomes = []
    for seq in range(RATE_BURST_DELTAS + 3):  # all at once, each on its own base
        intake.take_version(seq)
        outcomes.append(intake.handle(_delta(seq=seq, base_version=seq), now=100.0 + seq * 0.01))
    assert [o.kind for o in outcomes[:RATE_BURST_DELTAS]] == ["applied"] * RATE_BURST_DELTAS
    assert [o.reason for o in outcomes[RATE_BURST_DELTAS:]] == ["rate_limited"] * 3
    assert intake.rejected_by_reason == {"rate_limited": 3}
    intake.take_version(intake.version + 1)  # two seconds later one more token is back (30 a minute)
    later = 100.0 + RATE_BURST_DELTAS * 0.01 + 2.1
    assert intake.handle(_delta(seq=50, base_version=intake.version), now=later).kind == "applied"
    other = intake.handle(_delta(client_id="c2", seq=0, base_version=intake.version), now=later)
    assert other.kind == "applied"  # a bucket per client


def test_an_honest_client_at_a_normal_pace_is_never_rate_limited() -> None:
    intake, _ = rig(intake=IntakeConfig(max_staleness=10_000))
    now = 100.0
    for seq in range(200):  # a round every 2.5 s, some back to back after a pause
        intake.take_version(seq)
        now += 0.2 if seq % 10 == 1 else 2.5
        assert intake.handle(_delta(seq=seq, base_version=seq), now=now).kind == "applied", seq
    assert intake.rejected_by_reason == {}


def test_a_delta_in_parts_costs_one_token_at_its_first_part() -> None:
    limit = RateLimit(burst=2, per_minute=30.0)
    assert limit.refuse_first_part("c1", 100.0) is None
    assembled = Arrival("c1", 0, 5, 0, 10, 101.0, from_parts=True)
    for _ in range(5):
        assert limit.refuse(assembled) is None  # already paid at its first part
    assert limit.refuse(Arrival("c1", 1, 5, 0, 10, 101.0)) is None  # the second token
    refused = limit.refuse_first_part("c1", 101.0)
    assert refused is not None and refused[0] == "rate_limited"


def test_the_rate_limit_forgets_buckets_that_are_full_again() -> None:
    limit = RateLimit(burst=2, per_minute=60.0)  # a bucket is full again 2 s after its last delta
    for i in range(5000):  # a new client id every 10 ms
        limit.take(f"c{i}", now=i * 0.01)
        assert len(limit.buckets) <= 1025
    assert "c4999" in limit.buckets and "c0" not in limit.buckets


def test_no_rate_limit_when_turned_off() -> None:
    config = CoordinatorConfig(auth=AuthMode.OPEN, intake=IntakeConfig(max_deltas_per_minute=0))
    reg = ClientRegistry(config.plan)
    rules = admission_rules(config, barrier=None, warm=WarmStart(0, progress=RunProgress()), registry=reg)
    assert not any(isinstance(r, RateLimit) for r in rules)
    with pytest.raises(ConfigError):
        IntakeConfig(max_deltas_per_minute=-1)
    with pytest.raises(ConfigError):
        RateLimit(burst=0)


# ------------------------------------------------------------------ the warm start's holder


def test_the_operators_holder_trains_alone_and_nobody_else_takes_over() -> None:
    intake, warm = rig(plan=PlanConfig(local_steps=H, warm_start_steps=100, warm_start_client="chosen"))
    assert warm.current_holder(0.0) == "chosen"  # named before it ever sent
    first = intake.handle(_delta(client_id="stranger", seq=0), now=100.0)
    assert (first.kind, first.reason) == ("rejected", "warming_up")
    assert intake.handle(_delta(client_id="chosen", seq=0), now=101.0).kind == "applied"
    intake.take_version(6)
    # however long the holder is quiet, a stranger never becomes the holder
    late = intake.handle(_delta(client_id="stranger", seq=1, base_version=6), now=10_000.0)
    assert late.reason == "warming_up" and warm.current_holder(10_000.0) == "chosen"
    warm.load_state({"warm_start": {"holder": "stranger", "holder_seen": 1.0}})
    assert warm.holder == "chosen"  # the operator's choice wins over a checkpoint


def test_without_a_named_holder_the_first_sender_holds_and_a_warning_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="coordinator.warm_start"):
        _, warm = rig(plan=PlanConfig(warm_start_steps=100))
    assert "whoever sends the first delta holds the warm start" in caplog.text
    assert warm.current_holder(0.0) == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coordinator.warm_start"):
        rig(plan=PlanConfig(warm_start_steps=100, warm_start_client="chosen"))
        rig()  # no warm start at all
    assert caplog.text == ""


@pytest.mark.parametrize(("plan", "fragment"), [
    ({"warm_start_client": "alice"}, "needs --warm-start-steps"),
    ({"warm_start_client": "bad id!", "warm_start_steps": 10}, "is not a client id"),
    ({"warm_start_client": "x" * 65, "warm_start_steps": 10}, "is not a client id"),
])
def test_a_bad_warm_start_client_is_a_config_error(plan: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        PlanConfig(**plan)  # type: ignore[arg-type]


# ------------------------------------------------------------------ serve's options


@pytest.mark.parametrize(("args", "exit_code", "fragment"), [
    (["--warm-start-client", "alice"], 1, "--warm-start-client names the holder"),
    (["--warm-start-client", "bad id!", "--warm-start-steps", "10"], 1, "is not a client id"),
    (["--max-deltas-per-minute", "-1"], 2, "--max-deltas-per-minute"),
    (["--part-deadline", "0"], 2, "--part-deadline"),
])
def test_serve_refuses_bad_bounds_in_one_line(args: list[str], exit_code: int, fragment: str, tmp_path: Path,
                                              fake_service: list[FakeCoordinator]) -> None:
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path), "--auth", "open", *args])
    assert_one_line_error(result, exit_code, fragment)
    assert fake_service == []


def test_serve_hands_the_bounds_to_the_coordinator(tmp_path: Path,
                                                   fake_service: list[FakeCoordinator]) -> None:
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path), "--auth", "open", "--warm-start-steps", "60",
                     "--max-deltas-per-minute", "120", "--part-deadline", "90"],
                    env={"ASYNCLOCO_WARM_START_CLIENT": "alice"})
    assert result.exit_code == 0, result.output
    (built,) = fake_service
    assert built.config.plan.warm_start_client == "alice"
    assert built.config.intake.max_deltas_per_minute == 120.0
    assert built.config.spool.deadline_s == 90.0
    assert invoke(["serve", "--checkpoint-dir", str(tmp_path), "--auth", "open"]).exit_code == 0
    defaults = fake_service[-1].config
    assert (defaults.plan.warm_start_client, defaults.intake.max_deltas_per_minute,
            defaults.spool.deadline_s) == ("", RATE_DELTAS_PER_MINUTE, 600.0)
