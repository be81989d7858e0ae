"""Test-only crash points: die like ``kill -9`` at a named dangerous moment of the commit cycle.

The fault tests (``tests/faults``) start a real coordinator with ``--crash-at POINT[:N]``; the N-th
time (default the first) the process passes ``POINT`` it calls ``os._exit(137)``: no ``finally``,
no flush, no ack, exactly what a SIGKILL or a power cut leaves behind. The points, in the order a
commit passes them::

    after_apply      a delta applied in memory, before the commit that would include it
    mid_checkpoint   the checkpoint temp file half written, before its fsync and rename
    after_checkpoint the checkpoint renamed into place, before the acks are sent
    after_ack        the acks handed to the consumer thread, before the snapshot is published
    mid_snapshot     the snapshot chunks and manifest in Redis, before the ``current`` pointer flip
    part_spooled     a part of a big delta written to the spool, before its ack (not in a commit)

Production runs pass no crash point; :meth:`CrashPoints.hit` is then a dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter

from shared.errors import ConfigError

log = logging.getLogger(__name__)

POINTS = ("after_apply", "mid_checkpoint", "after_checkpoint", "after_ack", "mid_snapshot", "part_spooled")
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)


def parse_crash_at(text: str) -> tuple[str, int]:
    """``"POINT"`` or ``"POINT:N"`` → (point, n); raise ConfigError for an unknown point or n < 1."""
    point, sep, count = text.partition(":")
    if point not in POINTS:
        raise ConfigError(f"--crash-at: unknown point {point!r}; one of {', '.join(POINTS)}")
    try:
        n = int(count) if sep else 1
    except ValueError:
        raise ConfigError(f"--crash-at: {count!r} is not a count") from None
    if n < 1:
        raise ConfigError("--crash-at: the count must be >= 1")
    return point, n


class CrashPoints:
    """Counts passes through named points and exits the process at the configured one."""

    def __init__(self, crash_at: str | None) -> None:
        self.target = parse_crash_at(crash_at) if crash_at else None
        self.passes: Counter[str] = Counter()

    def hit(self, point: str) -> None:
        """Mark one pass through ``point``; exit at once (code 137) if this is the chosen pass."""
        if self.target is None:
            return
        self.passes[point] += 1
        if (point, self.passes[point]) == self.target:
            log.critical("crash point %s reached (pass %d): exiting with %d", point,
                         self.passes[point], EXIT_CODE)
            for handler in logging.getLogger().handlers:  # the log line is the test's evidence
                handler.flush()
            sys.stderr.flush()
            os._exit(EXIT_CODE)
