"""Progress within a round and the polite guest's pauses, in the worker's real code paths: the
trainer's per-step callback; a pause abandons the round in hand (no delta, no sequence number)
and the worker resumes by itself; a stop while paused ends it; --max-hours ends it after the
round in hand; --max-memory abandons the round in hand and the next starts at once. A real
LocalTrainer on a tiny task; stand-ins play Redis, RabbitMQ and the clock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from client.config import ClientConfig
from client.events import RoundStart, WorkerEvents
from client.memory_caps import GIB, MemoryCaps, MemoryGuard
from client.overlap import Overlap
from client.sender import DeltaSender
from client.stop import PauseWait, RunLimits
from client.uploader import Upload
from client.worker import Worker
from shared.codecs import get_codec
from shared.dylu import SpeedMeter
from shared.error_feedback import ErrorFeedback
from shared.keys import RunKeys
from shared.local_round import LocalTrainer, StepProgress
from shared.protocol import DeltaMessage
from shared.round_plan import RoundMode, RoundPlan
from tests.unit.test_local_round import LinearRegressionTask, make_trainer

# --- the trainer's progress callback ---------------------------------------------------------------


def test_progress_comes_after_the_first_step_then_every_interval_and_after_the_last() -> None:
    seen: list[StepProgress] = []
    stats = make_trainer().train(7, on_step=seen.append, progress_every_s=0.0)  # 0: every step
    assert [p.steps for p in seen] == [1, 2, 3, 4, 5, 6, 7]
    assert all(p.max_steps == 7 and p.loss >= 0 for p in seen)
    assert seen[-1].tokens == stats.tokens and seen[-1].elapsed_s <= stats.compute_s

    seen.clear()
    make_trainer().train(7, on_step=seen.append, progress_every_s=3600.0)
    assert [p.steps for p in seen] == [1, 7]  # the first and the last, nothing between

    seen.clear()
    make_trainer(LinearRegressionTask(loss_sleep_s=0.02)).train(30, on_step=seen.append, progress_every_s=0.1)
    assert 4 <= len(seen) <= 12 and seen[-1].steps == 30  # ~0.6 s of steps, one report per 0.1 s


def test_an_exception_from_the_callback_ends_the_round() -> None:
    trainer = make_trainer()

    def enough(progress: StepProgress) -> None:
        if progress.steps == 3:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        trainer.train(10, on_step=enough, progress_every_s=0.0)
    assert trainer.own_steps == 3


# --- the worker ------------------------------------------------------------------------------------


class Script:
    """A politeness whose answers are scripted: the next one per call, the last one repeated."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    def pause_reason(self) -> str | None:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return answer


@dataclass
class Heard(WorkerEvents):
    """Every event the worker sent, in order."""

    said: list[tuple[str, Any]] = field(default_factory=list)

    def round_started(self, start: RoundStart) -> None:
        self.said.append(("round_started", start.round))

    def step(self, progress: StepProgress) -> None:
        self.said.append(("step", progress.steps))

    def snapshot_read(self, version: int, nbytes: int) -> None:
        self.said.append(("snapshot_read", (version, nbytes)))

    def sending(self, nbytes: int) -> None:
        self.said.append(("sending", nbytes > 0))

    def paused(self, reason: str) -> None:
        self.said.append(("paused", reason))

    def resumed(self, paused_s: float) -> None:
        self.said.append(("resumed", paused_s >= 0))

    def abandoned(self, reason: str) -> None:
        self.said.append(("abandoned", reason))


class Sent:
    """The uploader's stand-in: every delta "confirmed" at once, and kept."""

    def __init__(self) -> None:
        self.messages: list[DeltaMessage] = []

    def connect(self) -> None: ...

    def keepalive(self) -> None: ...

    def check_payload(self, tensors: dict[str, bytes], codec: str) -> None: ...

    def send(self, message: DeltaMessage, give_up: Any) -> Upload:
        self.messages.append(message)
        return Upload(confirmed=True, body_bytes=1000, upload_s=0.0)


class Seqs:
    def __init__(self) -> None:
        self.client_id = "polite"
        self.next = 0

    def reserve_seq(self, run_id: str) -> int:
        self.next += 1
        return self.next - 1

    def next_seq(self, run_id: str) -> int:
        return self.next


def worker(tmp_path: Path, politeness: Script, *, steps: int = 5, loss_sleep_s: float = 0.0,
           snapshot_bytes: int = 0, memory: MemoryGuard | None = None,
           **config: Any) -> tuple[Worker, list[str], Heard, Sent, LocalTrainer]:
    """A Worker whose servers are stand-ins: version 0 of run "rid" and a fixed plan of ``steps``;
    ``memory``: its --max-memory check (default: no cap). Rounds neither overlap nor follow (the
    stand-ins hold one version; tests/unit/test_overlap.py covers those)."""
    trainer = make_trainer(LinearRegressionTask(loss_sleep_s=loss_sleep_s))
    plan = RoundPlan(run_id="rid", local_steps=steps, min_local_steps=1, fastest_steps_per_s=0.0,
                     active_clients=1, mode=RoundMode.FIXED)
    held = {"yes": snapshot_bytes == 0}  # with bytes to read, the first round downloads them

    def holds(version: int, manifest: Any) -> bool:
        answer, held["yes"] = held["yes"], True
        return answer

    w = Worker.__new__(Worker)
    w.config = ClientConfig(run="demo", coordinator_key="ab" * 32, state_dir=tmp_path, include_wait_s=0,
                            poll_s=0.005, **{"overlap": False, "follow": False, **config})
    w.stop, notices, w.events = threading.Event(), [], Heard()
    w.on_notice, w.on_confirmed = notices.append, None
    w.politeness = politeness  # type: ignore[assignment]
    w.memory = memory or MemoryGuard(MemoryCaps())
    w.keys, w.identity, w.uploader = RunKeys("demo"), Seqs(), Sent()  # type: ignore[assignment]
    w.fetcher = SimpleNamespace(  # type: ignore[assignment]
        ping=lambda: None, wait_while_another_warms_up=lambda *a: None, wait_for_version=lambda *a, **k: 0,
        manifest=None, wait_for_plan=lambda poll_s: plan, current_version=lambda max_age_s=0.0: 0)
    w.waits = SimpleNamespace(until_included=None, for_cycle_close=None)  # type: ignore[assignment]
    w.overlap, w._fresh_base = Overlap(w.waits), False
    w.replica = SimpleNamespace(  # type: ignore[assignment]
        holds=holds, reset=lambda: trainer, trainer=trainer, version=0, run_id="rid",
        take_newest=lambda fetcher, version: (snapshot_bytes, False),
        progress={})
    w.codec = get_codec("fp32")
    w.feedback, w.speed = ErrorFeedback(w.codec), SpeedMeter()
    w._last_sent = None
    w.limits = RunLimits(w.stop, max_seconds=w.config.max_seconds, max_hours=w.config.max_hours,
                         upload_grace_s=w.config.upload_grace_s)
    w.sender = DeltaSender(w.uploader, w.keys, "me", give_up=lambda: False,  # type: ignore[arg-type]
                           on_sent=w._sent)
    w.pauses = PauseWait(politeness, events=w.events, on_notice=w.on_notice, poll_s=w.config.poll_s,
                         should_stop=w.limits.should_stop, keepalive=w.sender.keepalive)
    w._received_bytes, w._previous_timings = 0, {}
    return w, notices, w.events, w.uploader, trainer  # type: ignore[return-value]


def test_a_pause_between_steps_abandons_the_round_and_the_worker_resumes_by_itself(tmp_path: Path) -> None:
    # before round 1: go; after its first step: on battery (twice asked); then plugged in again
    politeness = Script(None, "on battery", "on battery", None)
    w, notices, heard, sent, trainer = worker(tmp_path, politeness, steps=5, max_rounds=1)
    summary = w.run()
    assert notices == ["paused: on battery; round 1 abandoned after 1 steps, no delta sent (resumes by "
                       "itself; Ctrl-C to quit)", "resumed after 0.0 min of pause"]
    assert heard.said[:4] == [("round_started", 1), ("step", 1), ("paused", "on battery"), ("resumed", True)]
    assert heard.said[4] == ("round_started", 1) and heard.said[-1] == ("sending", True)
    # One delta, of the whole round that followed; the abandoned one cost no sequence number.
    assert [(m.seq, m.local_steps) for m in sent.messages] == [(0, 5)]
    assert (summary.rounds, summary.deltas_sent, summary.stopped_by) == (1, 1, "max_rounds")
    assert trainer.own_steps == 6  # the abandoned step was trained, then thrown away


def test_a_worker_outside_its_schedule_waits_before_the_first_round(tmp_path: Path) -> None:
    politeness = Script("outside --schedule 'sat-sun'", "outside --schedule 'sat-sun'", None)
    w, notices, heard, sent, _ = worker(tmp_path, politeness, max_rounds=1, snapshot_bytes=4096)
    reports: list[Any] = []
    w.run(on_round=reports.append)
    assert notices[0] == "paused: outside --schedule 'sat-sun' (resumes by itself; Ctrl-C to quit)"
    assert notices[1].startswith("resumed after ") and len(notices) == 2
    assert heard.said[0] == ("paused", "outside --schedule 'sat-sun'")
    assert ("snapshot_read", (0, 4096)) in heard.said
    assert len(sent.messages) == 1 and reports[0].received_bytes == 4096 and reports[0].run_id == "rid"


def test_a_stop_while_paused_ends_the_worker_without_a_delta(tmp_path: Path) -> None:
    w, notices, _, sent, _ = worker(tmp_path, Script("on battery"))
    threading.Timer(0.1, w.stop.set).start()
    summary = w.run()
    assert (summary.rounds, summary.stopped_by, sent.messages) == (0, "stop", [])
    assert notices == ["paused: on battery (resumes by itself; Ctrl-C to quit)"]


def test_max_hours_ends_the_round_in_hand_sends_it_and_stops(tmp_path: Path) -> None:
    # 0.1 s of training allowed; each step takes ~10 ms and progress is reported every 0.5 s
    w, _, _, sent, _ = worker(tmp_path, Script(None), steps=1000, loss_sleep_s=0.01, max_hours=0.1 / 3600)
    summary = w.run()
    assert (summary.rounds, summary.deltas_sent, summary.stopped_by) == (1, 1, "max_hours")
    assert 1 <= sent.messages[0].local_steps < 100  # cut at the next step after the limit was seen
    assert summary.line().startswith("stopped (max_hours): 1 rounds, 1 deltas sent")


def over_4_gb_once() -> MemoryGuard:
    """A --max-memory 4 check that reads 5 GB of resident memory once, then 3 GB."""
    readings = [5 * GIB, 3 * GIB]
    return MemoryGuard(MemoryCaps(max_rss_bytes=4 * GIB),
                       rss_bytes=lambda: readings.pop(0) if len(readings) > 1 else readings[0])


def test_over_max_memory_the_round_is_abandoned_and_the_next_starts_at_once(tmp_path: Path) -> None:
    guard = over_4_gb_once()  # over after round 1's first step; under from then on
    w, notices, heard, sent, trainer = worker(tmp_path, Script(None), steps=5, max_rounds=1, memory=guard)
    summary = w.run()
    reason = ("this client uses 5.00 GB of memory, over --max-memory 4 GB (if every round ends so, a "
              "smaller model or batch is the fix: the run's operator sets them; or raise --max-memory)")
    assert notices == [f"round 1 abandoned after 1 steps, no delta sent: {reason}"]  # no pause, no resume
    assert heard.said[:4] == [("round_started", 1), ("step", 1), ("abandoned", reason), ("round_started", 1)]
    assert not any(event == "paused" for event, _ in heard.said)
    assert [(m.seq, m.local_steps) for m in sent.messages] == [(0, 5)]  # the abandoned round cost no seq
    assert (summary.rounds, summary.deltas_sent, summary.stopped_by) == (1, 1, "max_rounds")
    assert trainer.own_steps == 6


def test_a_pause_after_a_round_over_memory_is_still_waited_out(tmp_path: Path) -> None:
    guard = over_4_gb_once()
    # before round 1: go; its first step: go (then over memory); before the next: on battery, then go
    politeness = Script(None, None, "on battery", None)
    w, notices, heard, sent, _ = worker(tmp_path, politeness, max_rounds=1, memory=guard)
    w.run()
    assert notices[0].startswith("round 1 abandoned after 1 steps, no delta sent: this client uses 5.00 GB")
    assert notices[1] == "paused: on battery (resumes by itself; Ctrl-C to quit)"
    assert notices[2].startswith("resumed after ") and len(sent.messages) == 1
