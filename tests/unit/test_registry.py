"""The client registry: speeds the coordinator measures itself, the round lengths it assigns, and
what a delta is credited. Nothing a client says about itself steers the plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.identity import AuthMode
from coordinator.outer_optimizer import OuterConfig
from coordinator.parts import PartSpool, SpoolConfig
from coordinator.registry import MIN_ROUND_S, OFFER_HISTORY, PLAN_LAG_S, ClientRegistry, PlanConfig
from coordinator.run_state import RunState, new_run_config
from coordinator.status import build_status, render_text
from shared.errors import ConfigError
from shared.round_plan import RoundMode
from tests.unit.test_intake import _delta, make_intake

H, H_MIN = 30, 3


def registry(**plan: object) -> ClientRegistry:
    return ClientRegistry(PlanConfig(local_steps=H, min_local_steps=H_MIN, **plan))  # type: ignore[arg-type]


def applied(reg: ClientRegistry, client_id: str, seq: int, *, base: int, steps: int, now: float,
            compute_s: float = 1.0, device: str = "", timings: dict[str, float] | None = None) -> None:
    reg.record_applied(client_id=client_id, seq=seq, base_version=base, local_steps=steps,
                       compute_s=compute_s, tokens=steps * 100, train_loss=2.0, staleness=0, now=now,
                       device=device, timings=timings)


TIMINGS = {"fetch_s": 0.5, "encode_s": 0.25, "upload_s": 1.25, "wait_s": 2.0}


# ------------------------------------------------------------------ the measured speed


def test_the_speed_is_steps_over_the_wall_time_since_the_later_of_base_publish_and_previous_arrival() -> None:
    reg = registry()
    reg.note_published(0, at=100.0)
    applied(reg, "c1", 0, base=0, steps=30, now=110.0)
    assert reg.clients["c1"].steps_per_s == 0.0  # a first delta measures nothing (its round included joining)
    reg.note_published(1, at=111.0)
    applied(reg, "c1", 1, base=1, steps=30, now=121.0)  # started at the publish of v1: 10 s
    assert reg.clients["c1"].steps_per_s == pytest.approx(3.0)
    reg.note_published(2, at=118.0)  # published while c1 was still training on v1
    applied(reg, "c1", 2, base=2, steps=30, now=126.0)  # started at its previous arrival (121): 5 s
    assert reg.clients["c1"].steps_per_s == pytest.approx(0.5 * 6.0 + 0.5 * 3.0)


def test_a_round_that_moved_onto_newer_snapshots_is_dated_from_the_one_it_began_on() -> None:
    """--follow: a round that began on v1 and ended on v3 took the time since v1's publish, not
    since v3's; a claimed origin later than its base (or none) changes nothing."""
    reg = registry()
    for version, at in ((0, 100.0), (1, 110.0), (2, 115.0), (3, 118.0)):
        reg.note_published(version, at=at)
    applied(reg, "c1", 0, base=0, steps=30, now=109.0)
    reg.record_applied(client_id="c1", seq=1, base_version=3, local_steps=30, compute_s=1.0, tokens=3000,
                       train_loss=2.0, staleness=0, now=120.0, origin_version=1)
    assert reg.clients["c1"].steps_per_s == pytest.approx(3.0)  # 30 steps in 10 s (not 2 s)
    reg.note_published(4, at=121.0)
    reg.note_published(5, at=125.0)
    # a liar naming a later origin than its base: dated from its base as ever (v4: 9 s)
    reg.record_applied(client_id="c1", seq=2, base_version=4, local_steps=30, compute_s=1.0, tokens=3000,
                       train_loss=2.0, staleness=0, now=130.0, origin_version=5)
    assert reg.clients["c1"].steps_per_s == pytest.approx(0.5 * 30 / 9 + 0.5 * 3.0)


def test_the_claimed_compute_time_is_shown_and_never_used() -> None:
    reg = registry()
    reg.note_published(0, at=100.0)
    reg.note_published(1, at=110.0)
    applied(reg, "c1", 0, base=0, steps=30, now=105.0, compute_s=1e-9)
    applied(reg, "c1", 1, base=1, steps=30, now=120.0, compute_s=1e-9)
    record = reg.clients["c1"]
    assert record.steps_per_s == pytest.approx(3.0)  # 30 steps in 10 s, whatever it says
    assert record.reported_compute_s == pytest.approx(1e-9)


def test_the_last_reported_device_is_kept_and_nothing_else_done_with_it() -> None:
    reg = registry()
    reg.note_published(0, at=100.0)
    reg.note_published(1, at=110.0)
    applied(reg, "c1", 0, base=0, steps=30, now=105.0, device="cpu (8 threads)")
    assert reg.clients["c1"].reported_device == "cpu (8 threads)"
    applied(reg, "c1", 1, base=1, steps=30, now=120.0, device="cuda: NVIDIA H200")  # moved to a GPU
    assert reg.clients["c1"].reported_device == "cuda: NVIDIA H200"
    assert reg.clients["c1"].steps_per_s == pytest.approx(3.0)  # measured here, whatever it says
    applied(reg, "c1", 2, base=1, steps=30, now=130.0)  # a client that predates the field: says nothing
    assert reg.clients["c1"].reported_device == ""


def test_the_intake_records_the_device_an_applied_delta_reports() -> None:
    intake, _ = make_intake({"a.weight": torch.ones(4, 3), "b": torch.zeros(5)},
                            OuterConfig(lr=0.01, momentum=0.0, buffer_size=1, compute_exponent=0.0),
                            version=5)
    assert intake.handle(_delta(device="mps"), now=100.0).kind == "applied"
    assert intake.registry.clients["c1"].reported_device == "mps"


def test_the_last_reported_round_timings_are_kept_and_nothing_else_done_with_them() -> None:
    reg = registry()
    reg.note_published(0, at=100.0)
    reg.note_published(1, at=110.0)
    applied(reg, "c1", 0, base=0, steps=30, now=105.0)  # a first round: nothing to say yet
    assert reg.clients["c1"].reported_timings == {}
    # "I waited a week and uploaded in no time": shown as said, while the speed stays measured here
    claim = {"fetch_s": 0.0, "encode_s": 0.0, "upload_s": 0.0, "wait_s": 604800.0}
    applied(reg, "c1", 1, base=1, steps=30, now=120.0, timings=claim)
    assert reg.clients["c1"].reported_timings == claim
    assert reg.clients["c1"].steps_per_s == pytest.approx(3.0)
    assert reg.plan("run", 121.0, RoundMode.DYLU).assignments == {"c1": H}
    applied(reg, "c1", 2, base=1, steps=30, now=130.0)  # a client that predates them says nothing
    assert reg.clients["c1"].reported_timings == {}


def test_the_intake_records_the_timings_an_applied_delta_reports_and_not_a_rejected_ones() -> None:
    intake, _ = make_intake({"a.weight": torch.ones(4, 3), "b": torch.zeros(5)},
                            OuterConfig(lr=0.01, momentum=0.0, buffer_size=1, compute_exponent=0.0),
                            version=5)
    assert intake.handle(_delta(previous_timings=TIMINGS), now=100.0).kind == "applied"
    assert intake.registry.clients["c1"].reported_timings == TIMINGS
    stale = {**TIMINGS, "wait_s": 9.0}
    assert intake.handle(_delta(seq=1, previous_timings=stale, local_steps=0), now=101.0).kind == "rejected"
    assert intake.registry.clients["c1"].reported_timings == TIMINGS


def test_a_round_shorter_than_the_clock_noise_is_no_measurement() -> None:
    reg = registry()
    reg.note_published(0, at=100.0)
    applied(reg, "c1", 0, base=0, steps=30, now=101.0)
    reg.note_published(1, at=110.0)
    applied(reg, "c1", 1, base=1, steps=30, now=110.0 + MIN_ROUND_S / 2)  # "30 steps in 25 ms"
    assert reg.clients["c1"].steps_per_s == 0.0


def test_a_republish_keeps_the_first_publish_time_and_old_versions_are_forgotten() -> None:
    reg = registry()
    reg.note_published(5, at=100.0)
    reg.note_published(5, at=200.0)
    reg.note_published(-1, at=300.0)  # nothing published yet: ignored
    assert reg.published_at == {5: 100.0}
    for version in range(6, 2000):
        reg.note_published(version, at=float(version))
    assert 5 not in reg.published_at and len(reg.published_at) == 1024 and 1999 in reg.published_at


# ------------------------------------------------------------------ the plan's assignments


def _two_measured(reg: ClientRegistry, *, slow_compute_s: float = 1.0, t0: float = 0.0) -> None:
    """fast: 30 steps in 2 s (15 steps/s); slow: 10 steps in 5 s (2 steps/s); from ``t0`` + 100 s.
    Each reports its device: fast a GPU, slow a CPU."""
    gpu, cpu = "cuda: NVIDIA H200", "cpu (8 threads)"
    reg.note_published(0, at=t0 + 100.0)
    applied(reg, "fast", 0, base=0, steps=30, now=t0 + 101.0, device=gpu)
    applied(reg, "slow", 0, base=0, steps=10, now=t0 + 101.0, compute_s=slow_compute_s, device=cpu)
    reg.note_published(1, at=t0 + 102.0)
    applied(reg, "fast", 1, base=1, steps=30, now=t0 + 104.0, device=gpu, timings=TIMINGS)
    applied(reg, "slow", 1, base=1, steps=10, now=t0 + 107.0, compute_s=slow_compute_s, device=cpu)


def test_the_plan_assigns_each_measured_active_client_its_dylu_round() -> None:
    reg = registry()
    _two_measured(reg)
    applied(reg, "newcomer", 0, base=1, steps=30, now=107.0)  # active, not measured yet
    plan = reg.plan("run", 108.0, RoundMode.DYLU)
    assert plan.fastest_steps_per_s == pytest.approx(15.0)
    assert plan.assignments == {"fast": 30, "slow": 4}  # floor(2 / 15 · 30)
    assert plan.active_clients == 3 and "newcomer" not in plan.assignments  # it runs H on the budget
    later = reg.plan("run", 108.0 + reg.plan_config.active_window_s + 5, RoundMode.DYLU)
    assert later.assignments == {}  # nobody active any more


def test_the_plan_grace_period_is_a_share_of_the_fastest_clients_round() -> None:
    reg = registry(grace_rounds=0.25)
    assert reg.plan("run", 100.0, RoundMode.DYLU).grace_s == 0.0  # no speed measured yet
    _two_measured(reg)
    plan = reg.plan("run", 108.0, RoundMode.DYLU)  # fastest 15 steps/s: a round of H = 30 is 2 s
    assert plan.grace_s == pytest.approx(0.5)
    assert reg.plan("run", 108.0, RoundMode.FIXED).grace_s == pytest.approx(0.5)
    assert reg.plan("run", 108.0, RoundMode.SYNC).grace_s == 0.0  # the barrier already waits
    assert registry().plan("run", 108.0, RoundMode.DYLU).grace_s == 0.0  # off
    with pytest.raises(ConfigError):
        PlanConfig(grace_rounds=-1)


@pytest.mark.parametrize("mode", [RoundMode.FIXED, RoundMode.SYNC, RoundMode.WARM_START])
def test_only_a_dylu_plan_assigns(mode: RoundMode) -> None:
    reg = registry()
    _two_measured(reg)
    assert reg.plan("run", 108.0, mode).assignments == {}
    assert reg.assignment_limit("slow", 1) == H  # everybody runs H


def test_a_lying_compute_time_changes_nobody_elses_assignment() -> None:
    honest, lied_to = registry(), registry()
    _two_measured(honest)
    _two_measured(lied_to, slow_compute_s=1e-9)  # "slow" claims to be a billion times faster
    assert lied_to.plan("run", 108.0, RoundMode.DYLU).assignments == \
        honest.plan("run", 108.0, RoundMode.DYLU).assignments == {"fast": 30, "slow": 4}


def test_a_lying_compute_time_changes_nobody_elses_assignment_through_the_intake() -> None:
    def run(liar_compute_s: float) -> dict[str, int]:
        intake, _ = make_intake({"a.weight": torch.ones(4, 3), "b": torch.zeros(5)},
                                OuterConfig(lr=0.01, momentum=0.0, buffer_size=1, compute_exponent=0.0),
                                version=0)
        reg = intake.registry
        for version, (published, arrivals) in enumerate([(100.0, (101.0, 101.5, 102.0)),
                                                         (103.0, (105.0, 106.0, 113.0))]):
            intake.take_version(version)
            reg.note_published(version, published)
            for cid, now, compute_s in zip(("fast", "liar", "slow"), arrivals,
                                           (1.0, liar_compute_s, 1.0), strict=True):
                body = _delta(client_id=cid, seq=version, base_version=version, local_steps=10,
                              compute_s=compute_s)
                assert intake.handle(body, now=now).kind == "applied"
        return reg.plan("run", 114.0, RoundMode.DYLU).assignments

    honest = run(3.0)
    assert run(1e-12) == honest
    assert honest["fast"] == H and honest["slow"] < honest["liar"] < H


# ------------------------------------------------------------------ what a delta may claim and is credited


def test_the_limit_is_the_most_any_plan_offered_since_the_base_was_published() -> None:
    reg = registry()
    _two_measured(reg)
    assert reg.assignment_limit("stranger", 1) == H  # unknown to the plans: H
    assert reg.assignment_limit("slow", 1) == H  # before any plan named it, it ran H
    reg.note_published(2, at=110.0)
    reg.plan("run", 110.0 + PLAN_LAG_S + 1, RoundMode.DYLU)  # offers slow 4
    reg.note_published(3, at=200.0)
    assert reg.assignment_limit("slow", 3) == 4
    assert reg.assignment_limit("slow", 2) == H  # v2's round may have started on the older plan
    assert reg.assignment_limit("slow", 99) == H  # a base without a publish time: H


def test_an_assignment_that_shrinks_mid_round_does_not_refuse_the_round() -> None:
    reg = registry()
    _two_measured(reg)
    reg.note_published(2, at=200.0)
    reg.clients["slow"].steps_per_s = 15.0
    reg.plan("run", 201.0, RoundMode.DYLU)  # slow reads 30 ...
    reg.clients["slow"].steps_per_s = 2.0
    reg.plan("run", 202.0, RoundMode.DYLU)  # ... and the plan drops it to 4 before its delta arrives
    assert reg.assignment_limit("slow", 2) == 30


def test_credit_is_at_most_the_assignment_and_tokens_follow() -> None:
    reg = registry()
    _two_measured(reg)
    reg.plan("run", 150.0, RoundMode.DYLU)  # slow: 4, and nothing else since
    reg.note_published(2, at=200.0)
    assert reg.credit("slow", 2, local_steps=5, tokens=500, samples=50) == (4, 400, 40)
    assert reg.credit("slow", 2, local_steps=3, tokens=300, samples=30) == (3, 300, 30)
    assert reg.credit("fast", 2, local_steps=30, tokens=3000, samples=300) == (30, 3000, 300)


def test_offers_are_kept_on_change_only_and_bounded() -> None:
    reg = registry()
    _two_measured(reg)
    for i in range(5):
        reg.plan("run", 110.0 + i, RoundMode.DYLU)
    assert [steps for _, steps in reg.clients["slow"].offers] == [4]
    for i in range(3 * OFFER_HISTORY):
        reg.plan("run", 120.0 + i, RoundMode.DYLU if i % 2 else RoundMode.FIXED)
    assert len(reg.clients["slow"].offers) == OFFER_HISTORY


def test_the_registry_survives_a_checkpoint_as_json() -> None:
    reg = registry()
    _two_measured(reg)
    reg.plan("run", 108.0, RoundMode.DYLU)
    restored = registry()
    restored.load_state(json.loads(json.dumps(reg.save_state())))
    assert restored.published_at == reg.published_at == {0: 100.0, 1: 102.0}
    assert restored.clients == reg.clients
    assert restored.clients["fast"].reported_device == "cuda: NVIDIA H200"
    assert restored.clients["fast"].reported_timings == TIMINGS
    assert restored.plan("run", 108.0, RoundMode.DYLU).assignments == {"fast": 30, "slow": 4}
    old = {"clients": {"c1": {"client_id": "c1", "steps_per_s": 2.0, "updates": 3}}}  # before these fields
    restored.load_state(old)
    assert restored.clients["c1"].last_base == -1 and restored.published_at == {}
    assert restored.clients["c1"].reported_device == "" and restored.clients["c1"].reported_timings == {}


def test_a_delta_within_the_slack_is_applied_but_credited_only_its_assignment() -> None:
    intake, _ = make_intake({"a.weight": torch.ones(4, 3), "b": torch.zeros(5)},
                            OuterConfig(lr=0.01, momentum=0.0, buffer_size=1, compute_exponent=0.0),
                            version=5)
    assert intake.handle(_delta(local_steps=H + 5, tokens=7000), now=100.0).kind == "applied"  # in slack
    assert intake.progress.local_steps == H and intake.progress.tokens == 7000 * H // (H + 5)
    assert intake.registry.clients["c1"].local_steps == H


# ------------------------------------------------------------------ what status shows


def test_status_shows_each_clients_measured_speed_and_assignment(tmp_path: Path) -> None:
    config = CoordinatorConfig(auth=AuthMode.OPEN, plan=PlanConfig(local_steps=H, min_local_steps=H_MIN),
                               task_settings={"model_size": "tiny", "max_corpus_bytes": 200_000,
                                              "eval_sequences": 2, "batch_size": 2})
    run = RunState(config, run_id="r-1", run_config=new_run_config(config), applied_log=None)
    _two_measured(run.registry, slow_compute_s=0.001, t0=time.time() - 110.0)
    spool = PartSpool(tmp_path / "parts", SpoolConfig())
    doc = json.loads(json.dumps(build_status(run, consumer=None, spool=spool, started_at=0.0)))
    clients = {c["client_id"]: c for c in doc["clients"]}
    assert clients["fast"]["steps_per_s"] == pytest.approx(15.0)
    assert clients["slow"]["steps_per_s"] == pytest.approx(2.0)
    assert (clients["fast"]["assigned_steps"], clients["slow"]["assigned_steps"]) == (30, 4)
    assert clients["slow"]["reported_compute_s"] == pytest.approx(0.001)  # shown, and that is all
    assert (clients["fast"]["reported_device"], clients["slow"]["reported_device"]) == (
        "cuda: NVIDIA H200", "cpu (8 threads)")
    assert (clients["fast"]["reported_timings"], clients["slow"]["reported_timings"]) == (TIMINGS, {})
    assert doc["plan"]["assigned_clients"] == 2 and doc["schema"] == 1
    text = render_text(doc)
    header = next(line for line in text.splitlines() if line.startswith("client "))
    assert "H next" in header and header.endswith("  fetch/enc/up/wait s      device (reported)")
    no_timings = " -" + " " * 22  # the column's "-", padded
    assert any(line.startswith("slow") and " 4 " in line and line.endswith(no_timings + "  cpu (8 threads)")
               for line in text.splitlines())
    assert any(line.startswith("fast") and line.endswith("  0.50/0.25/1.25/2.00      cuda: NVIDIA H200")
               for line in text.splitlines())
    for c in doc["clients"]:  # a document of an older coordinator, without the new keys, still renders
        del c["assigned_steps"], c["reported_device"], c["reported_timings"]
    fast = next(line for line in render_text(doc).splitlines() if line.startswith("fast"))
    assert fast.endswith(no_timings + "  -")  # no timings, no device reported
    doc["deltas"]["guard"] = {"mode": "clip", "judged": 9, "clipped": 1, "damped": 2,
                              "direction_distrusted": 3}
    assert "guard (clip): judged=9 clipped=1 damped=2 distrusted=3" in render_text(doc).splitlines()
    del doc["deltas"]["guard"]["direction_distrusted"]  # an older coordinator's document
    assert "guard (clip): judged=9 clipped=1 damped=2 distrusted=0" in render_text(doc).splitlines()
    doc["deltas"]["guard"].update(distrust_tried=2, distrust_cleared=1)  # tried on the operator's data
    line = "guard (clip): judged=9 clipped=1 damped=2 distrusted=0 tried=2 cleared=1"
    assert line in render_text(doc).splitlines()
