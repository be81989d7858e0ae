"""Stopping politely: the first Ctrl-C or SIGTERM asks the worker to finish up, the second exits now.

The worker only ever looks at a :class:`threading.Event`; the signal handlers that set it are
installed by the CLI (signal handlers can only be installed from the main thread).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType


class StopRequested(Exception):
    """Raised inside the worker to unwind a wait when a stop was asked for (never escapes run())."""


class RoundAbandoned(Exception):
    """Raised between training steps when the machine's owner wants it back (the schedule, the
    battery, a busy machine: :mod:`client.politeness`): the round ends without a delta, and the
    worker pauses (never escapes run()). ``steps``: how many were done and thrown away."""

    def __init__(self, reason: str, *, steps: int = 0, elapsed_s: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.steps = steps
        self.elapsed_s = elapsed_s


class BaseLost(RoundAbandoned):
    """Raised after a round that moved mid-way (client/overlap.py) lost its base: a signed patch
    that did not apply, and then a whole snapshot of another run. The round ends without a delta
    (said, not waited on); the next one starts from the newest snapshot, read whole."""


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
