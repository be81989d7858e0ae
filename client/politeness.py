"""A polite guest: whether this machine may train now, by its owner's rules.

Three rules, asked before every round and between training steps (about every half second):

* ``--schedule``: weekly windows in local time, e.g. ``mon-fri 19:00-07:00, sat-sun``; outside
  them the client pauses.
* On battery (Linux: every AC or USB supply in ``/sys/class/power_supply`` reports ``online`` 0)
  the client pauses, unless ``--run-on-battery``. A machine without such files is never on battery.
* ``--idle-only``: pause while the machine is in use, which is any of

  - other processes keep more than ``--idle-load`` cores busy: the 1-minute load average less this
    process's own share, which is its CPU use smoothed as the kernel smooths the load (so that the
    client's own work never reads as the owner's, and its pause does not read as the owner
    leaving). A pause for load lasts at least ``idle_pause_s`` (the load average needs about that
    long to show that the owner is gone);
  - a keyboard, mouse or terminal was used within the last ``--idle-after`` minutes;
  - another process computes on an NVIDIA GPU (``nvidia-smi``).

  How the last two are read, and when they are unknown (then they never pause), is
  :mod:`client.owner_activity`; they are read at most every ``PROBE_EVERY_S``.

Pausing abandons the round in hand (no delta is sent for it) and resumes without a restart; the
worker does that, this module only answers :meth:`Politeness.pause_reason`. It is pure logic: the
clock and the machine's sensors come in as :class:`Sensors`, so each rule is tested without a
laptop, a busy machine or a Monday.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Generic, TypeVar

from client.owner_activity import last_input_s, other_gpu_processes
from shared.errors import ConfigError

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")  # datetime.weekday()
DAY_ALIASES = {"daily": range(7), "weekdays": range(5), "weekend": range(5, 7)}
MINUTES_PER_DAY = 24 * 60
POWER_SUPPLY = Path("/sys/class/power_supply")
LOAD_WINDOW_S = 60.0  # the time constant of the kernel's 1-minute load average
IDLE_AFTER_S = 5 * 60.0
PROBE_EVERY_S = 10.0  # input and GPU use are read at most this often (loginctl, nvidia-smi are processes)
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_DAY_HELP = "mon..sun, a range such as mon-fri or fri-mon, weekdays, weekend or daily"


class ScheduleError(ConfigError):
    """A ``--schedule`` that cannot be read; the message says which part and why, in one line."""


@dataclass(frozen=True)
class Window:
    """Training allowed on ``days`` (0 = Monday) from ``start_min`` to ``end_min`` minutes after
    midnight; an end at or before the start runs past midnight into the next day (so
    ``fri 19:00-07:00`` ends on Saturday morning)."""

    days: frozenset[int]
    start_min: int = 0  # 0..1439
    end_min: int = MINUTES_PER_DAY  # 1..1440

    def __post_init__(self) -> None:
        if not self.days or not self.days <= set(range(7)):
            raise ScheduleError(f"a window needs days within 0..6, got {sorted(self.days)}")
        if not (0 <= self.start_min < MINUTES_PER_DAY and 0 < self.end_min <= MINUTES_PER_DAY):
            raise ScheduleError(f"window times out of range: {self.start_min}..{self.end_min} minutes")

    @property
    def wraps(self) -> bool:
        return self.end_min <= self.start_min

    def contains(self, when: datetime) -> bool:
        minute, day = when.hour * 60 + when.minute, when.weekday()
        if not self.wraps:
            return day in self.days and self.start_min <= minute < self.end_min
        return ((day in self.days and minute >= self.start_min)
                or ((day - 1) % 7 in self.days and minute < self.end_min))


@dataclass(frozen=True)
class Schedule:
    """When training is allowed: any of ``windows``. Build it with :meth:`parse`."""

    windows: tuple[Window, ...]
    text: str = ""  # as the volunteer wrote it, for messages

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Read ``mon-fri 19:00-07:00, sat-sun``: windows separated by commas, each days, hours
        (``HH:MM-HH:MM``, 24:00 allowed as an end) or both; days alone mean all day, hours alone
        every day. Raises :class:`ScheduleError` with a one-line reason."""
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or not all(parts):
            raise ScheduleError(f"schedule {text!r}: expected windows separated by commas, such as "
                                "'mon-fri 19:00-07:00, sat-sun'")
        return cls(tuple(_parse_window(part) for part in parts), text.strip())

    def allows(self, when: datetime) -> bool:
        return any(window.contains(when) for window in self.windows)

    def next_start(self, when: datetime) -> datetime | None:
        """The first minute from ``when`` on that training is allowed (None: never, which a parsed
        schedule cannot be)."""
        minute = when.replace(second=0, microsecond=0)
        for _ in range(7 * MINUTES_PER_DAY + 1):
            if self.allows(minute):
                return minute
            minute += timedelta(minutes=1)
        return None


def _parse_window(part: str) -> Window:
    words = part.lower().split()
    if len(words) > 2:
        raise ScheduleError(f"schedule window {part!r}: expected days, hours (HH:MM-HH:MM) or "
                            "days then hours")
    days: frozenset[int] = frozenset(range(7))
    start, end = 0, MINUTES_PER_DAY
    hours = [word for word in words if any(c.isdigit() for c in word)]
    names = [word for word in words if word not in hours]
    if len(hours) > 1 or len(names) > 1 or (hours and words[0] == hours[0] and names):
        raise ScheduleError(f"schedule window {part!r}: expected days, hours (HH:MM-HH:MM) or "
                            "days then hours")
    if names:
        days = _parse_days(names[0], part)
    if hours:
        start, end = _parse_hours(hours[0], part)
    return Window(days, start, end)


def _day(name: str, part: str) -> int:
    for index, day in enumerate(DAYS):
        if len(name) >= 3 and day.startswith(name):  # "mon", "mond" or "monday"
            return index
    raise ScheduleError(f"schedule window {part!r}: unknown day {name!r} (use {_DAY_HELP})")


def _parse_days(spec: str, part: str) -> frozenset[int]:
    if spec in DAY_ALIASES:
        return frozenset(DAY_ALIASES[spec])
    if spec.count("-") > 1:
        raise ScheduleError(f"schedule window {part!r}: {spec!r} is not a day or a range (use {_DAY_HELP})")
    first, _, last = spec.partition("-")
    start = _day(first, part)
    stop = _day(last, part) if last else start
    return frozenset((start + offset) % 7 for offset in range((stop - start) % 7 + 1))  # fri-mon wraps


def _parse_hours(spec: str, part: str) -> tuple[int, int]:
    match = _HOURS.match(spec)
    if match is None:
        raise ScheduleError(f"schedule window {part!r}: hours must read HH:MM-HH:MM, not {spec!r}")
    h1, m1, h2, m2 = (int(group) for group in match.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise ScheduleError(f"schedule window {part!r}: {spec!r} is not a time of day (00:00 to 24:00)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % MINUTES_PER_DAY:
        raise ScheduleError(f"schedule window {part!r}: {spec!r} starts where it ends; leave the hours "
                            "out for all day")
    return start, end or MINUTES_PER_DAY  # "19:00-00:00" ends at midnight


def on_battery(power_supply: Path = POWER_SUPPLY) -> bool:
    """True if this machine has an external supply (AC, USB) and none of them is online. Batteries
    themselves are skipped; a supply without an ``online`` file says nothing, and a machine with
    none of them (a desktop, a server, macOS, Windows) is never on battery."""
    online: list[bool] = []
    try:
        supplies = sorted(power_supply.iterdir())
    except OSError:
        return False
    for supply in supplies:
        try:
            if (supply / "type").read_text().strip() == "Battery":
                continue
        except OSError:
            pass
        try:
            online.append((supply / "online").read_text().strip() == "1")
        except OSError:
            continue
    return bool(online) and not any(online)


def _load_1min() -> float:
    return os.getloadavg()[0]


def _last_input_now() -> float | None:
    return last_input_s(time.time())


@dataclass(frozen=True)
class Sensors:
    """Where the rules read the world; the defaults read this machine (local time, the load
    average, this process's CPU time, the power supplies, the last input, other GPU processes)."""

    local_time: Callable[[], datetime] = datetime.now
    monotonic: Callable[[], float] = time.monotonic
    load_1min: Callable[[], float] = _load_1min
    own_cpu_s: Callable[[], float] = time.process_time  # all threads of this process
    on_battery: Callable[[], bool] = on_battery
    wall_s: Callable[[], float] = time.time  # Unix seconds, as file and logind times are
    last_input_s: Callable[[], float | None] = _last_input_now  # Unix seconds; None: unknown
    other_gpu_pids: Callable[[], frozenset[int] | None] = other_gpu_processes  # None: unknown


@dataclass(frozen=True)
class PolitenessConfig:
    """The owner's rules. ``idle_load`` None: ``--idle-only`` is off; else pause while other
    processes keep more than that many cores busy, while input was seen within ``idle_after_s``
    and while another process computes on a GPU. ``idle_pause_s``: the shortest pause for load.
    ``pause_on_battery`` is off here (in-process workers, tests) and on in ``asyncloco-client join``
    unless ``--run-on-battery``."""

    schedule: Schedule | None = None
    pause_on_battery: bool = False
    idle_load: float | None = None
    idle_pause_s: float = LOAD_WINDOW_S
    idle_after_s: float = IDLE_AFTER_S

    def __post_init__(self) -> None:
        if self.idle_load is not None and not (math.isfinite(self.idle_load) and self.idle_load > 0):
            raise ConfigError(f"--idle-load must be a number of cores > 0, got {self.idle_load}")
        if not (math.isfinite(self.idle_after_s) and self.idle_after_s > 0):
            raise ConfigError(f"--idle-after must be minutes > 0, got {self.idle_after_s / 60:g}")
        if not (math.isfinite(self.idle_pause_s) and self.idle_pause_s >= 0):
            raise ConfigError(f"idle_pause_s must be >= 0, got {self.idle_pause_s}")
        if self.idle_load is not None and not hasattr(os, "getloadavg"):  # pragma: no cover (Windows)
            raise ConfigError("--idle-only needs the load average, which this platform does not have")


class OwnLoad:
    """This process's share of the load average: its CPU use (cores busy) smoothed with the
    kernel's time constant, so that it can be taken out of the load the kernel reports."""

    def __init__(self) -> None:
        self.cores = 0.0
        self._last: tuple[float, float] | None = None  # (monotonic s, own CPU s) at the last update

    def update(self, now_s: float, cpu_s: float) -> float:
        if self._last is not None:
            dt = now_s - self._last[0]
            if dt > 0:
                rate = max(0.0, cpu_s - self._last[1]) / dt  # cores busy on average over dt
                keep = math.exp(-dt / LOAD_WINDOW_S)
                self.cores = keep * self.cores + (1 - keep) * rate
        self._last = (now_s, cpu_s)
        return self.cores


T = TypeVar("T")


class Throttled(Generic[T]):
    """``probe``'s answer, asked again only once ``every_s`` have passed by ``monotonic``."""

    def __init__(self, probe: Callable[[], T], every_s: float, monotonic: Callable[[], float]) -> None:
        self.probe, self.every_s, self.monotonic = probe, every_s, monotonic
        self._asked: tuple[float, T] | None = None  # (monotonic s, answer) of the last probe

    def __call__(self) -> T:
        now = self.monotonic()
        if self._asked is None or now - self._asked[0] >= self.every_s:
            self._asked = (now, self.probe())
        return self._asked[1]


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Politeness:
    """Answers "may this machine train now?" from ``config`` and ``sensors``."""

    def __init__(self, config: PolitenessConfig, sensors: Sensors | None = None) -> None:
        self.config = config
        self.sensors = sensors or Sensors()
        self.own = OwnLoad()
        self._busy_until = -math.inf  # monotonic time before which a pause for load goes on
        self._last_input = Throttled(self.sensors.last_input_s, PROBE_EVERY_S, self.sensors.monotonic)
        self._gpu_pids = Throttled(self.sensors.other_gpu_pids, PROBE_EVERY_S, self.sensors.monotonic)

    def pause_reason(self) -> str | None:
        """Why training must pause now (one line), or None if it may go on."""
        schedule = self.config.schedule
        if schedule is not None:
            now = self.sensors.local_time()
            if not schedule.allows(now):
                start = schedule.next_start(now)
                return (f"outside --schedule {schedule.text!r}"
                        + (f" (next window {start:%a %H:%M})" if start is not None else ""))
        if self.config.pause_on_battery and self.sensors.on_battery():
            return "on battery (--run-on-battery trains anyway)"
        if self.config.idle_load is not None:
            return self._busy() or self._input() or self._gpu()
        return None

    def _busy(self) -> str | None:
        assert self.config.idle_load is not None
        now = self.sensors.monotonic()
        own = self.own.update(now, self.sensors.own_cpu_s())
        others = max(0.0, self.sensors.load_1min() - own)
        if others > self.config.idle_load:
            self._busy_until = now + self.config.idle_pause_s
            return (f"the machine is in use (load {others:.2f} besides this client, above --idle-load "
                    f"{self.config.idle_load:g})")
        if now < self._busy_until:
            return f"the machine was in use {self.config.idle_pause_s - (self._busy_until - now):.0f} s ago"
        return None

    def _input(self) -> str | None:
        last = self._last_input()
        if last is None:
            return None  # unknown: never a reason to pause
        ago = max(0.0, self.sensors.wall_s() - last)
        if ago < self.config.idle_after_s:
            return (f"the machine is in use (keyboard, mouse or terminal input {_ago(ago)} ago, within "
                    f"--idle-after {self.config.idle_after_s / 60:g} min)")
        return None

    def _gpu(self) -> str | None:
        pids = self._gpu_pids()
        if not pids:
            return None  # none, or unknown
        shown = ", ".join(str(pid) for pid in sorted(pids)[:3]) + (", ..." if len(pids) > 3 else "")
        return f"another process computes on the GPU (pid {shown}, by nvidia-smi)"
