"""The polite guest's rules without a machine in that state: --schedule windows (parsed, wrapping
midnight, the next window), the battery as /sys/class/power_supply tells it, and --idle-only's
load with this process's own share taken out, its recent input (--idle-after) and other GPU
processes; the clock and sensors are handed in. And join's options, as they reach the config."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from client import cli
from client.config import ClientConfig
from client.memory_caps import GIB
from client.politeness import (
    PROBE_EVERY_S,
    OwnLoad,
    Politeness,
    PolitenessConfig,
    Schedule,
    ScheduleError,
    Sensors,
    Window,
    on_battery,
)
from shared.errors import ConfigError

# 2024-06-03 is a Monday.
MON, TUE, FRI, SAT, SUN = 3, 4, 7, 8, 9


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 6, day, hour, minute)


# --- parsing --------------------------------------------------------------------------------------


def test_a_schedule_of_weekday_evenings_and_the_weekend() -> None:
    schedule = Schedule.parse("mon-fri 19:00-07:00, sat-sun")
    assert schedule.windows == (Window(frozenset(range(5)), 19 * 60, 7 * 60), Window(frozenset({5, 6})))
    assert schedule.text == "mon-fri 19:00-07:00, sat-sun"


@pytest.mark.parametrize(("text", "days", "start", "end"), [
    ("weekdays", range(5), 0, 1440),
    ("weekend 10:00-12:30", {5, 6}, 600, 750),
    ("daily", range(7), 0, 1440),
    ("22:00-06:00", range(7), 1320, 360),
    ("Friday-Monday", {4, 5, 6, 0}, 0, 1440),  # a range may wrap the week, full names welcome
    ("WED 9:05-24:00", {2}, 545, 1440),
    ("sun 18:00-00:00", {6}, 1080, 1440),  # ending at midnight
])
def test_each_form_of_a_window(text: str, days: set[int] | range, start: int, end: int) -> None:
    assert Schedule.parse(text).windows == (Window(frozenset(days), start, end),)


@pytest.mark.parametrize(("text", "says"), [
    ("", "expected windows separated by commas"),
    ("mon-fri,, sat", "expected windows separated by commas"),
    ("mon-fry 19:00-07:00", "unknown day 'fry'"),
    ("mo 19:00-07:00", "unknown day 'mo'"),
    ("mon-wed-fri", "is not a day or a range"),
    ("mon-fri 25:00-07:00", "'25:00-07:00' is not a time of day"),
    ("mon 24:30-07:00", "is not a time of day"),
    ("mon 7pm-9pm", "hours must read HH:MM-HH:MM"),
    ("mon 19:00-19:00", "starts where it ends"),
    ("mon 19:00-07:00 extra", "expected days, hours"),
    ("19:00-07:00 mon", "expected days, hours"),
    ("mon tue", "expected days, hours"),
])
def test_a_bad_schedule_is_one_line_that_names_the_part(text: str, says: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        Schedule.parse(text)
    message = str(caught.value)
    assert says in message and "\n" not in message
    assert isinstance(caught.value, ConfigError)  # the CLI's one-line error path


# --- when a schedule allows -----------------------------------------------------------------------


def test_an_evening_window_runs_past_midnight_into_the_next_day() -> None:
    schedule = Schedule.parse("mon-fri 19:00-07:00")
    assert not schedule.allows(at(MON, 18, 59))
    assert schedule.allows(at(MON, 19, 0))
    assert schedule.allows(at(TUE, 6, 59))  # Monday's window, after midnight
    assert not schedule.allows(at(TUE, 7, 0))
    assert not schedule.allows(at(MON, 3, 0))  # Sunday night is not in it
    assert schedule.allows(at(SAT, 6, 0))  # Friday's night ends on Saturday morning
    assert not schedule.allows(at(SAT, 19, 30))


def test_windows_add_up() -> None:
    schedule = Schedule.parse("mon-fri 19:00-07:00, sat-sun")
    assert schedule.allows(at(SAT, 12)) and schedule.allows(at(SUN, 23, 59))
    assert not schedule.allows(at(MON, 7, 30))  # Sunday's whole day ended at midnight, Monday's starts 19:00
    assert not schedule.allows(at(FRI, 12))


def test_the_next_window_is_found_across_days() -> None:
    schedule = Schedule.parse("mon-fri 19:00-07:00, sat-sun")
    assert schedule.next_start(at(MON, 12, 30)) == at(MON, 19, 0)
    assert schedule.next_start(datetime(2024, 6, MON, 20, 15, 42)) == at(MON, 20, 15)  # already in one
    assert Schedule.parse("sun 10:00-11:00").next_start(at(MON, 12)) == at(SUN, 10, 0)


# --- the battery ----------------------------------------------------------------------------------


def supply(root: Path, name: str, kind: str, online: str | None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "type").write_text(kind + "\n")
    if online is not None:
        (folder / "online").write_text(online + "\n")


def test_unplugged_means_on_battery_and_plugged_in_does_not(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", "Battery", None)
    supply(tmp_path, "AC", "Mains", "0")
    assert on_battery(tmp_path)
    (tmp_path / "AC" / "online").write_text("1\n")
    assert not on_battery(tmp_path)


def test_any_external_supply_online_is_enough(tmp_path: Path) -> None:
    supply(tmp_path, "AC", "Mains", "0")
    supply(tmp_path, "ucsi-source-psy-1", "USB", "1")
    assert not on_battery(tmp_path)


def test_no_supply_files_mean_not_on_battery(tmp_path: Path) -> None:
    assert not on_battery(tmp_path / "absent")  # no /sys/class/power_supply at all (macOS, a container)
    assert not on_battery(tmp_path)  # a desktop: nothing there
    supply(tmp_path, "BAT0", "Battery", "0")  # a battery's own "online" is not the AC's
    supply(tmp_path, "hidpp_battery_0", "Battery", None)
    supply(tmp_path, "AC", "Mains", None)  # no online file: says nothing
    assert not on_battery(tmp_path)


# --- the rules together ---------------------------------------------------------------------------


class Machine:
    """Sensors whose readings the test sets: the local time, the load, our CPU time, the battery."""

    def __init__(self) -> None:
        self.now = at(MON, 12)
        self.mono = 1000.0
        self.wall = 1_717_400_000.0
        self.load = 0.0
        self.cpu_s = 0.0
        self.battery = False
        self.input_at: float | None = None  # the owner's last input (Unix s); None: unknown
        self.gpu: frozenset[int] | None = None  # other processes on a GPU; None: unknown
        self.probes = {"input": 0, "gpu": 0}

    def last_input(self) -> float | None:
        self.probes["input"] += 1
        return self.input_at

    def gpu_pids(self) -> frozenset[int] | None:
        self.probes["gpu"] += 1
        return self.gpu

    def sensors(self) -> Sensors:
        return Sensors(local_time=lambda: self.now, monotonic=lambda: self.mono, load_1min=lambda: self.load,
                       own_cpu_s=lambda: self.cpu_s, on_battery=lambda: self.battery,
                       wall_s=lambda: self.wall, last_input_s=self.last_input, other_gpu_pids=self.gpu_pids)

    def wait(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def run(self, seconds: float, *, own_cores: float, others: float) -> None:
        """Let ``seconds`` pass with this process keeping ``own_cores`` busy and other processes
        ``others``; the load average moves towards the sum as the kernel's does (e^(-t/60))."""
        self.wait(seconds)
        self.cpu_s += own_cores * seconds
        keep = math.exp(-seconds / 60.0)
        self.load = keep * self.load + (1 - keep) * (own_cores + others)


def test_no_rules_no_pause() -> None:
    machine = Machine()
    machine.battery = True
    assert Politeness(PolitenessConfig(), machine.sensors()).pause_reason() is None  # battery: off by default


def test_outside_the_schedule_it_pauses_and_says_until_when() -> None:
    machine = Machine()
    polite = Politeness(PolitenessConfig(schedule=Schedule.parse("mon-fri 19:00-07:00")), machine.sensors())
    assert polite.pause_reason() == "outside --schedule 'mon-fri 19:00-07:00' (next window Mon 19:00)"
    machine.now = at(MON, 19, 1)
    assert polite.pause_reason() is None


def test_on_battery_it_pauses_unless_told_to_run() -> None:
    machine = Machine()
    machine.battery = True
    polite = Politeness(PolitenessConfig(pause_on_battery=True), machine.sensors())
    assert polite.pause_reason() == "on battery (--run-on-battery trains anyway)"
    machine.battery = False
    assert polite.pause_reason() is None


def test_own_load_follows_the_kernels_one_minute_smoothing() -> None:
    own = OwnLoad()
    own.update(0.0, 0.0)
    for second in range(1, 601):  # ten minutes at 2 cores
        cores = own.update(float(second), 2.0 * second)
    assert cores == pytest.approx(2.0, abs=1e-3)
    cores = own.update(660.0, 1200.0)  # a minute idle: down by e, as the load average would be
    assert cores == pytest.approx(2.0 / 2.718281828, rel=1e-3)


def seconds_until_paused(machine: Machine, polite: Politeness, *, own_cores: float, others: float) -> int:
    for second in range(1, 601):
        machine.run(1.0, own_cores=own_cores, others=others)
        if polite.pause_reason() is not None:
            return second
    return 601


def test_idle_only_counts_other_processes_not_this_one() -> None:
    machine = Machine()
    polite = Politeness(PolitenessConfig(idle_load=1.0, idle_pause_s=60.0), machine.sensors())
    assert polite.pause_reason() is None
    # This client alone, busy on 4 cores for ten minutes: a load of 4 is its own, not the owner's.
    assert seconds_until_paused(machine, polite, own_cores=4.0, others=0.2) == 601
    assert machine.load == pytest.approx(4.2, abs=0.01)
    # The owner starts a build on 2.5 cores: its share of the load passes 1 within about 30 s.
    assert 25 <= seconds_until_paused(machine, polite, own_cores=4.0, others=2.5) <= 35
    reason = polite.pause_reason()
    assert reason is not None and reason.startswith("the machine is in use (load 1.")
    assert reason.endswith("besides this client, above --idle-load 1)")


def test_a_pause_for_load_lasts_at_least_the_load_averages_minute() -> None:
    machine = Machine()
    polite = Politeness(PolitenessConfig(idle_load=1.0, idle_pause_s=60.0), machine.sensors())
    assert seconds_until_paused(machine, polite, own_cores=0.0, others=3.0) < 30
    machine.run(5.0, own_cores=0.0, others=0.0)  # the owner leaves; the load average falls behind
    assert polite.pause_reason() is not None
    machine.run(30.0, own_cores=0.0, others=0.0)
    reason = polite.pause_reason()  # below 1 now, but not for a minute yet
    assert reason is not None and reason.startswith("the machine was in use ") and reason.endswith(" s ago")
    machine.run(40.0, own_cores=0.0, others=0.0)
    assert polite.pause_reason() is None


@pytest.mark.parametrize("kwargs", [{"idle_load": 0.0}, {"idle_load": float("nan")}, {"idle_pause_s": -1.0},
                                    {"idle_after_s": 0.0}, {"idle_after_s": float("inf")}])
def test_a_bad_politeness_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PolitenessConfig(**kwargs)  # type: ignore[arg-type]


# --- --idle-only: input and other GPU processes ---------------------------------------------------


def idle_only(machine: Machine, idle_after_s: float = 300.0) -> Politeness:
    return Politeness(PolitenessConfig(idle_load=1.0, idle_after_s=idle_after_s), machine.sensors())


def test_input_within_idle_after_pauses_until_that_long_has_passed() -> None:
    machine = Machine()
    polite = idle_only(machine)
    machine.input_at = machine.wall - 42  # a key pressed 42 s ago
    assert polite.pause_reason() == ("the machine is in use (keyboard, mouse or terminal input 42 s ago, "
                                     "within --idle-after 5 min)")
    machine.wait(200)
    reason = polite.pause_reason()
    assert reason is not None and "input 4.0 min ago" in reason
    machine.wait(60)  # 302 s since the key: idle
    assert polite.pause_reason() is None
    machine.input_at = machine.wall - 1  # the owner is back
    machine.wait(PROBE_EVERY_S)
    assert polite.pause_reason() is not None


def test_unknown_input_never_pauses() -> None:
    machine = Machine()
    polite = idle_only(machine)
    assert machine.input_at is None and polite.pause_reason() is None  # macOS, Windows, a container
    assert machine.probes["input"] == 1


def test_input_and_gpu_are_read_at_most_every_probe_interval() -> None:
    machine = Machine()
    polite = idle_only(machine)
    for _ in range(int(PROBE_EVERY_S / 0.5)):  # a step every half second
        assert polite.pause_reason() is None
        machine.wait(0.5)
    assert machine.probes == {"input": 1, "gpu": 1}
    machine.gpu = frozenset({4242})  # seen at the next probe, not before
    assert polite.pause_reason() is not None and machine.probes == {"input": 2, "gpu": 2}


def test_another_process_on_the_gpu_pauses_until_it_ends() -> None:
    machine = Machine()
    polite = idle_only(machine)
    machine.gpu = frozenset({31337, 4242, 777, 9})
    assert polite.pause_reason() == ("another process computes on the GPU (pid 9, 777, 4242, ..., by "
                                     "nvidia-smi)")
    machine.gpu = frozenset()
    machine.wait(PROBE_EVERY_S)
    assert polite.pause_reason() is None
    machine.gpu = None  # nvidia-smi failed or timed out: unknown, no pause
    machine.wait(PROBE_EVERY_S)
    assert polite.pause_reason() is None


def test_without_idle_only_input_and_gpu_are_never_read() -> None:
    machine = Machine()
    machine.input_at, machine.gpu = machine.wall, frozenset({1})
    assert Politeness(PolitenessConfig(), machine.sensors()).pause_reason() is None
    assert machine.probes == {"input": 0, "gpu": 0}


# --- join's options ---------------------------------------------------------------------------------


def test_joins_idle_and_memory_options_reach_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[ClientConfig] = []

    class NoWorker:
        """Takes the config join built, then ends join as a bad setting would (one line, exit 1)."""

        def __init__(self, config: ClientConfig, **kwargs: object) -> None:
            seen.append(config)
            raise ConfigError("enough")

    monkeypatch.setattr("client.worker.Worker", NoWorker)
    args = ["join", "--coordinator-key", "ab" * 32, "--state-dir", str(tmp_path), "--plain", "--idle-only",
            "--idle-after", "2.5", "--max-memory", "3", "--max-gpu-memory", "0.5"]
    result = CliRunner().invoke(cli.main, args, prog_name="asyncloco-client")
    assert result.exit_code == 1 and "enough" in result.output
    politeness, memory = seen[0].politeness, seen[0].memory
    assert (politeness.idle_load, politeness.idle_after_s) == (1.0, 150.0)
    assert (memory.max_rss_bytes, memory.max_gpu_fraction) == (3 * GIB, 0.5)

    result = CliRunner().invoke(cli.main, args[:5], prog_name="asyncloco-client")  # none of them
    assert result.exit_code == 1
    politeness, memory = seen[1].politeness, seen[1].memory
    assert politeness.idle_load is None and politeness.idle_after_s == 300.0
    assert (memory.max_rss_bytes, memory.max_gpu_fraction) == (0, 0.0)


@pytest.mark.parametrize("option", [["--idle-after", "0"], ["--max-memory", "-1"],
                                    ["--max-gpu-memory", "1.5"]])
def test_bad_idle_and_memory_options_are_usage_errors(option: list[str]) -> None:
    result = CliRunner().invoke(cli.main, ["join", "--coordinator-key", "ab" * 32, *option],
                                prog_name="asyncloco-client")
    assert result.exit_code == 2 and option[0] in result.output
