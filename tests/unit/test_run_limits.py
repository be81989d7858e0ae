"""RunLimits: when a worker's run is up, and what its summary says ended it."""

from __future__ import annotations

import threading
import time

from client.stop import RunLimits


def test_without_limits_only_a_stop_ends_the_run_and_the_summary_says_stop() -> None:
    stop = threading.Event()
    limits = RunLimits(stop)
    limits.start()
    limits.add_trained(10_000.0)
    limits.note_training(10_000.0)
    assert not limits.should_stop() and not limits.give_up_upload()
    stop.set()
    assert limits.should_stop()
    assert limits.stopped_by("stop") == "stop"
    assert limits.stopped_by("max_rounds") == "max_rounds"


def test_max_seconds_counts_wall_time_from_start() -> None:
    limits = RunLimits(threading.Event(), max_seconds=0.5)
    assert not limits.should_stop()  # not started: no deadline yet
    limits.start()
    assert not limits.should_stop()  # (a margin of 0.5 s for a loaded machine)
    time.sleep(0.55)
    assert limits.should_stop()
    assert limits.stopped_by("stop") == "max_seconds"


def test_max_hours_counts_training_only_the_round_in_hand_included() -> None:
    limits = RunLimits(threading.Event(), max_hours=1.0)
    limits.start()
    limits.add_trained(3000.0)  # rounds done, abandoned ones included
    limits.note_training(500.0)  # the round in hand so far: 3500 s < 3600 s
    assert not limits.should_stop()
    limits.note_training(600.0)  # 3600 s reached mid-round: the round ends at the next step
    assert limits.hours_up and limits.should_stop()
    assert limits.stopped_by("stop") == "max_hours"


def test_a_requested_stop_is_named_as_such_even_past_a_limit() -> None:
    stop = threading.Event()
    limits = RunLimits(stop, max_hours=1.0)
    limits.note_training(4000.0)
    stop.set()
    assert limits.stopped_by("stop") == "stop"


def test_a_stopping_client_gives_up_its_last_upload_after_the_grace_period() -> None:
    stop = threading.Event()
    limits = RunLimits(stop, upload_grace_s=0.05)
    assert not limits.give_up_upload()  # not stopping: keep trying
    stop.set()
    assert not limits.give_up_upload()  # the grace period counts from the stop's first notice
    time.sleep(0.06)
    assert limits.give_up_upload()
