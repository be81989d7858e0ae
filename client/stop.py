"""Stopping and pausing politely: when a worker stops, and how it waits out a pause.

The first Ctrl-C or SIGTERM asks the worker to finish up, the second exits now. The worker only
ever looks at a :class:`threading.Event`; the signal handlers that set it are installed by the CLI
(signal handlers can only be installed from the main thread). :class:`RunLimits` adds the
volunteer's own limits to that event (``--max-seconds`` of wall time, ``--max-hours`` of training),
and :class:`PauseWait` waits, said once, while the owner's rules (:mod:`client.politeness`) want
the machine back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from shared.settings import sleep_interruptibly


class StopRequested(Exception):
    """Raised inside the worker to unwind a wait when a stop was asked for (never escapes run())."""


class RoundAbandoned(Exception):
    """Raised between training steps when the machine's owner wants it back (the schedule, the
    battery, a busy machine: :mod:`client.politeness`): the round ends without a delta, and the
    worker pauses (never escapes run()). ``steps``: how many were done and thrown away."""

    waits = True  # False: said, then the next round starts at once (a pause would not help)

    def __init__(self, reason: str, *, steps: int = 0, elapsed_s: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.steps = steps
        self.elapsed_s = elapsed_s


class BaseLost(RoundAbandoned):
    """Raised after a round that moved mid-way (client/overlap.py) lost its base: a signed patch
    that did not apply, and then a whole snapshot of another run. The round ends without a delta
    (said, not waited on); the next one starts from the newest snapshot, read whole."""

    waits = False


class StopSignals:
    """Handlers for SIGINT and SIGTERM: first signal sets ``event``, a second one exits at once.

    The immediate exit uses ``os._exit(128 + signum)`` (130 for Ctrl-C): no traceback, and no
    chance of hanging in a blocked network call or a torch kernel during interpreter shutdown.
    ``on_first`` is called (from the handler) with a short note, e.g. to print it; ``on_second``
    just before the immediate exit (the live display shows the terminal's cursor again).
    """

    def __init__(self, event: threading.Event, on_first: Callable[[str], None] | None = None,
                 on_second: Callable[[], None] | None = None) -> None:
        self.event = event
        self.on_first = on_first
        self.on_second = on_second
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            if self.on_second is not None:
                self.on_second()
            sys.stderr.write("\nsecond interrupt: exiting now\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(128 + signum)
        self.event.set()
        if self.on_first is not None:
            name = signal.Signals(signum).name
            self.on_first(f"{name}: stopping once the round in hand is sent (Ctrl-C again: quit now)")

    def install(self) -> StopSignals:
        """Install the handlers for SIGINT and SIGTERM (main thread only); return self."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()


class RunLimits:
    """When a worker's run is up: a stop request, ``max_seconds`` of wall time, ``max_hours`` of training.

    A stop or the end of ``max_seconds`` ends the round in hand at the next training step, whose
    steps are still sent for at most ``upload_grace_s``. ``max_hours`` counts this process's
    training time (abandoned rounds included; pauses and waits on the coordinator do not count)
    and, once reached, stops the same way. 0 means no limit.
    """

    def __init__(self, stop: threading.Event, *, max_seconds: float = 0.0, max_hours: float = 0.0,
                 upload_grace_s: float = 30.0) -> None:
        self.stop = stop
        self.max_seconds = max_seconds
        self.max_hours = max_hours
        self.upload_grace_s = upload_grace_s
        self.trained_s = 0.0  # compute time of this process's rounds, abandoned ones included
        self.hours_up = False  # max_hours reached: the round in hand is the last
        self._deadline: float | None = None  # time.monotonic() when max_seconds is up
        self._stop_seen: float | None = None  # when a stop or the deadline was first noticed

    def start(self) -> None:
        """The run begins: ``max_seconds`` counts from now."""
        if self.max_seconds > 0:
            self._deadline = time.monotonic() + self.max_seconds

    def should_stop(self) -> bool:
        """True once a stop was asked for, or max_seconds or max_hours is up (checked between
        training steps; max_hours is noticed by :meth:`note_training`)."""
        past = self._deadline is not None and time.monotonic() >= self._deadline
        if (self.stop.is_set() or past) and self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return self._stop_seen is not None

    def give_up_upload(self) -> bool:
        """A stopping client tries to send its last delta for ``upload_grace_s``, then gives up."""
        if not self.should_stop() or self._stop_seen is None:
            return False
        return time.monotonic() - self._stop_seen > self.upload_grace_s

    def add_trained(self, seconds: float) -> None:
        """Count ``seconds`` of training (a round's compute, sent or abandoned) against max_hours."""
        self.trained_s += seconds

    def note_training(self, round_s: float) -> None:
        """Once this process has trained ``max_hours`` (``round_s``: the round in hand so far),
        stop as a first Ctrl-C would: the round in hand ends at the next step and is sent."""
        limit_s = self.max_hours * 3600
        if limit_s and not self.hours_up and self.trained_s + round_s >= limit_s:
            self.hours_up = True
            if self._stop_seen is None:
                self._stop_seen = time.monotonic()

    def stopped_by(self, reason: str) -> str:
        """What ended the run, for its summary: ``reason`` ("max_rounds", "stop"), unless a
        "stop" that nobody asked for was the end of ``max_hours`` or ``max_seconds``."""
        if reason != "stop" or self.stop.is_set():
            return reason
        if self.hours_up:
            return "max_hours"
        return "max_seconds" if self._deadline is not None else reason


class PauseRules(Protocol):
    def pause_reason(self) -> str | None: ...


class PauseEvents(Protocol):
    def abandoned(self, reason: str) -> None: ...

    def paused(self, reason: str) -> None: ...

    def resumed(self, paused_s: float) -> None: ...


class PauseWait:
    """Before each round: wait while ``rules`` say pause, saying so once, and once more on resuming.

    ``keepalive`` is called every ``poll_s`` of a pause, so that one of hours does not let the
    AMQP connection time out; ``should_stop`` ends the wait with :class:`StopRequested`.
    """

    def __init__(self, rules: PauseRules, *, events: PauseEvents, on_notice: Callable[[str], None],
                 poll_s: float, should_stop: Callable[[], bool], keepalive: Callable[[], None]) -> None:
        self.rules = rules
        self.events = events
        self.on_notice = on_notice
        self.poll_s = poll_s
        self.should_stop = should_stop
        self.keepalive = keepalive

    def before_round(self, abandoned: RoundAbandoned | None, number: int) -> None:
        """Before round ``number``. ``abandoned``: the round that a pause rule, ``--max-memory``
        or a lost base just ended (the last two are said, not waited on: ``RoundAbandoned.waits``)."""
        if abandoned is not None and not abandoned.waits:
            self.on_notice(f"round {number} abandoned after {abandoned.steps} steps, no delta sent: "
                           f"{abandoned.reason}")
            self.events.abandoned(abandoned.reason)
            abandoned = None
        reason = abandoned.reason if abandoned is not None else self.rules.pause_reason()
        if reason is None:
            return
        lost = ("" if abandoned is None
                else f"; round {number} abandoned after {abandoned.steps} steps, no delta sent")
        self.on_notice(f"paused: {reason}{lost} (resumes by itself; Ctrl-C to quit)")
        self.events.paused(reason)
        started = time.monotonic()
        while True:
            if sleep_interruptibly(self.poll_s, self.should_stop):
                raise StopRequested()
            self.keepalive()
            if self.rules.pause_reason() is None:
                break
        paused_s = time.monotonic() - started
        self.on_notice(f"resumed after {paused_s / 60:.1f} min of pause")
        self.events.resumed(paused_s)
