"""--idle-only's probes of the owner's activity, on files whose times the test sets (os.utime) and
on sample output of loginctl and nvidia-smi: the last input of devices, terminals and logind
sessions; the other processes on a GPU; unknown wherever nothing can be read."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from client.owner_activity import (
    gpu_pids,
    input_device_time,
    logind_last_input,
    newest_time,
    other_gpu_pids,
    other_gpu_processes,
    run_command,
    session_ids,
    sessions_last_input,
    terminal_time,
)

T0 = 1_717_400_000.0  # Unix seconds


def node(folder: Path, name: str, *, atime: float, mtime: float) -> Path:
    path = folder / name
    path.write_text("")
    os.utime(path, (atime, mtime))
    return path


# --- device and terminal times ---------------------------------------------------------------------


def test_an_input_device_counts_its_newest_access_or_modification(tmp_path: Path) -> None:
    mouse = node(tmp_path, "mice", atime=T0 + 30, mtime=T0)
    keyboard = node(tmp_path, "event3", atime=T0, mtime=T0 + 90)  # plugged in at T0 + 90
    assert input_device_time([mouse]) == T0 + 30
    assert input_device_time([mouse, keyboard]) == T0 + 90


def test_a_terminal_counts_only_its_access_time_which_is_input(tmp_path: Path) -> None:
    # Output (this client's own panel, say) moves the modification time: it is not the owner's input.
    pts = node(tmp_path, "3", atime=T0, mtime=T0 + 600)
    tty = node(tmp_path, "tty2", atime=T0 + 20, mtime=T0)
    assert terminal_time([pts]) == T0
    assert terminal_time([pts, tty]) == T0 + 20


def test_what_cannot_be_stated_says_nothing(tmp_path: Path) -> None:
    assert newest_time([]) is None  # no /dev/input at all: a container, macOS
    assert newest_time([tmp_path / "event0", tmp_path / "gone"]) is None
    seen = node(tmp_path, "event1", atime=T0, mtime=T0 + 5)
    assert newest_time([tmp_path / "gone", seen]) == T0 + 5


# --- logind ------------------------------------------------------------------------------------------

LIST_SESSIONS_252 = """\
      2 1000 alice seat0 tty2
     c1  120 gdm   seat0 tty1
     17 1000 alice       pts/3
"""
LIST_SESSIONS_256 = """\
  2 1000 alice seat0 1871 user    tty2 no   -
  5 1000 alice -     2210 manager -    no   -
"""


def test_session_ids_are_the_first_column_in_either_layout() -> None:
    assert session_ids(LIST_SESSIONS_252) == ["2", "c1", "17"]
    assert session_ids(LIST_SESSIONS_256) == ["2", "5"]
    assert session_ids("") == [] and session_ids("\n\n") == []


def show(**sessions: tuple[str, str, float]) -> str:
    """``loginctl show-session`` output: for each session its Type, IdleHint and IdleSinceHint (s)."""
    return "\n".join(f"Type={kind}\nIdleHint={hint}\nIdleSinceHint={int(since * 1e6)}\n"
                     for kind, hint, since in sessions.values())


def test_a_graphical_session_idle_since_t_had_its_last_input_by_t() -> None:
    now = T0 + 3600
    assert sessions_last_input(show(s2=("wayland", "yes", T0)), now) == T0


def test_a_graphical_session_back_from_idle_is_in_use_now() -> None:
    now = T0 + 3600
    assert sessions_last_input(show(s2=("x11", "no", T0)), now) == now


def test_a_text_sessions_hint_is_its_ttys_last_input() -> None:
    now = T0 + 3600
    assert sessions_last_input(show(s17=("tty", "no", T0 + 100)), now) == T0 + 100  # idle or not
    assert sessions_last_input(show(s17=("tty", "yes", T0 + 100), s2=("wayland", "yes", T0)), now) == T0 + 100


def test_sessions_that_logind_knows_nothing_of_say_nothing() -> None:
    # No tty (a lingering user's manager, cron) or a desktop that never reports: IdleSinceHint=0.
    now = T0 + 3600
    assert sessions_last_input(show(s5=("unspecified", "no", 0), s2=("wayland", "no", 0)), now) is None
    assert sessions_last_input("", now) is None
    assert sessions_last_input("IdleHint=no\nIdleSinceHint=soon\n", now) is None


class Loginctl:
    """Answers as loginctl would, from sample output; None (a failed command) where not given."""

    def __init__(self, listed: str | None, shown: str | None) -> None:
        self.listed, self.shown = listed, shown
        self.asked: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float) -> str | None:
        self.asked.append(list(argv))
        assert argv[0] == "loginctl" and timeout_s <= 2.0  # a short call, never a hang
        return self.listed if argv[1] == "list-sessions" else self.shown


def test_logind_is_asked_about_every_listed_session() -> None:
    loginctl = Loginctl(LIST_SESSIONS_252, show(s2=("wayland", "yes", T0), s17=("tty", "no", T0 + 50)))
    assert logind_last_input(T0 + 600, loginctl) == T0 + 50
    assert loginctl.asked[1][-3:] == ["2", "c1", "17"] and "IdleSinceHint" in loginctl.asked[1]


def test_without_logind_nothing_is_known() -> None:
    # loginctl missing or "System has not been booted with systemd" (a container): no sessions.
    assert logind_last_input(T0, Loginctl(None, None)) is None
    assert logind_last_input(T0, Loginctl("", "")) is None
    assert logind_last_input(T0, Loginctl(LIST_SESSIONS_252, None)) is None  # a session vanished


# --- other processes on a GPU -----------------------------------------------------------------------


def test_the_pids_of_nvidia_smis_compute_apps() -> None:
    assert gpu_pids("4242\n777\n") == frozenset({4242, 777})
    assert gpu_pids("") == frozenset()  # nothing computes
    assert gpu_pids(" 31 \n[Not Found]\n\n") == frozenset({31})  # a line that is no number names nobody


def test_this_process_and_those_beyond_this_proc_are_not_others(tmp_path: Path) -> None:
    for pid in (100, 200):
        (tmp_path / str(pid)).mkdir()
    # 200 is this process; 300 is not in this /proc (a container seeing the host's ids).
    assert other_gpu_pids([100, 200, 300], own_pid=200, proc=tmp_path) == frozenset({100})


def test_other_gpu_processes_reads_nvidia_smi_and_a_failure_is_unknown(tmp_path: Path) -> None:
    own = os.getpid()
    (tmp_path / "100").mkdir()
    (tmp_path / str(own)).mkdir()
    asked: list[list[str]] = []

    def smi(argv: Sequence[str], timeout_s: float) -> str | None:
        asked.append(list(argv))
        return f"{own}\n100\n"

    assert other_gpu_processes(smi, proc=tmp_path) == frozenset({100})
    assert asked == [["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]]
    assert other_gpu_processes(lambda argv, timeout_s: None, proc=tmp_path) is None


# --- the commands themselves -------------------------------------------------------------------------


def test_a_command_gives_its_output_or_none() -> None:
    assert run_command([sys.executable, "-c", "print('4242')"], 10.0) == "4242\n"
    assert run_command([sys.executable, "-c", "import sys; sys.exit(9)"], 10.0) is None  # as with no driver
    assert run_command(["asyncloco-no-such-command"], 10.0) is None  # not installed
    assert run_command([sys.executable, "-c", "import time; time.sleep(30)"], 0.5) is None  # too slow
