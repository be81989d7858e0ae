"""What the owner is doing with this machine, for ``--idle-only``: when a keyboard, mouse or
terminal was last used, and which other processes compute on an NVIDIA GPU.

Read without any new dependency and without X libraries (Linux; each source that cannot be read
says nothing):

* input devices: the newest access or modification time of ``/dev/input/event*`` and
  ``/dev/input/mice`` (a node created by plugging in a keyboard or a mouse reads as use);
* terminals: the newest access time of ``/dev/pts/N`` and ``/dev/ttyN``, as ``w``'s IDLE column
  (the kernel sets a tty's access time when its input is read; its modification time is output,
  the client's own panel included, so it is not looked at);
* systemd-logind, when ``loginctl`` exists: its sessions' ``IdleHint`` and ``IdleSinceHint``
  (graphical sessions get them from the desktop, text ones from their tty);
* ``nvidia-smi --query-compute-apps=pid``, when it is on PATH: the processes computing on a GPU.

Where nothing can be read (macOS, Windows, a container without ``/dev/input``), the last input
is None, "unknown", and never a reason to pause; so is a failed or slow ``nvidia-smi``. Each probe
is a small function of the paths or the command output it is handed; the readers at the end of
the module hand them this machine's.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

INPUT_DEVICES = ("/dev/input/event*", "/dev/input/mice")
TERMINALS = ("/dev/pts/[0-9]*", "/dev/tty[0-9]*")  # not /dev/pts/ptmx, /dev/ttyS0 (serial), /dev/tty
GRAPHICAL = frozenset({"x11", "wayland", "mir"})  # logind session types whose hint the desktop sets
LOGINCTL_TIMEOUT_S = 1.0
NVIDIA_SMI_TIMEOUT_S = 2.0

Run = Callable[[Sequence[str], float], str | None]  # (argv, timeout s) -> stdout, None on failure


def newest_time(paths: Iterable[Path], *, modified: bool = True) -> float | None:
    """The newest access time (and, if ``modified``, modification time) among ``paths``, in Unix
    seconds; paths that cannot be stat'ed are skipped, and None means none could be."""
    newest: float | None = None
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        seen = max(info.st_atime, info.st_mtime) if modified else info.st_atime
        newest = seen if newest is None else max(newest, seen)
    return newest


def input_device_time(paths: Iterable[Path]) -> float | None:
    """When an input device (``/dev/input/event*``, ``mice``) was last read, written or plugged in."""
    return newest_time(paths)


def terminal_time(paths: Iterable[Path]) -> float | None:
    """When a terminal (``/dev/pts/N``, ``/dev/ttyN``) last had its input read: its access time."""
    return newest_time(paths, modified=False)


def session_ids(list_sessions: str) -> list[str]:
    """The session ids in ``loginctl list-sessions --no-legend``'s output (its first column)."""
    return [line.split()[0] for line in list_sessions.splitlines() if line.split()]


def sessions_last_input(show_session: str, now_s: float) -> float | None:
    """The last input that logind knows of, from ``loginctl show-session -p Type -p IdleHint -p
    IdleSinceHint ID...`` (blocks of ``Key=value`` lines separated by blank lines), in Unix seconds.

    A graphical session idle since T had its last input by T; one that is not idle, after being
    idle once, is in use now (``now_s``). A text session's ``IdleSinceHint`` is its tty's access
    time. An ``IdleSinceHint`` of 0 means logind does not know (a session without a tty, a desktop
    that never reports): such a session says nothing. None: no session says anything.
    """
    newest: float | None = None
    for block in show_session.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip()
        try:
            since_s = int(fields.get("IdleSinceHint", "0")) / 1e6  # microseconds since the epoch
        except ValueError:
            continue
        if since_s <= 0:
            continue
        idle = fields.get("IdleHint") == "yes"
        seen = now_s if fields.get("Type") in GRAPHICAL and not idle else since_s
        newest = seen if newest is None else max(newest, seen)
    return newest


def gpu_pids(query_compute_apps: str) -> frozenset[int]:
    """The process ids in ``nvidia-smi --query-compute-apps=pid --format=csv,noheader``'s output
    (one per line; a line that is no number, such as ``[Not Found]``, names no process)."""
    return frozenset(int(line) for line in (raw.strip() for raw in query_compute_apps.splitlines())
                     if line.isdigit())


def other_gpu_pids(pids: Iterable[int], own_pid: int, proc: Path = Path("/proc")) -> frozenset[int]:
    """Those of ``pids`` that are another process of this machine: not ``own_pid``, and present in
    ``proc``. In a container nvidia-smi names processes by the host's ids, this one's included, and
    those are not in the container's /proc: there, GPU use reads as unknown rather than as the
    owner's."""
    return frozenset(pid for pid in pids if pid != own_pid and (proc / str(pid)).is_dir())


# -- this machine ----------------------------------------------------------------------------------


def run_command(argv: Sequence[str], timeout_s: float) -> str | None:
    """``argv``'s standard output, or None if it is not installed, fails or takes over ``timeout_s``."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def expand(patterns: Iterable[str]) -> list[Path]:
    """The paths that match any of the glob ``patterns``."""
    return [Path(name) for pattern in patterns for name in sorted(glob.glob(pattern))]


def logind_last_input(now_s: float, run: Run = run_command) -> float | None:
    """:func:`sessions_last_input` of this machine's sessions, asked of ``loginctl`` (two short
    calls); None where there is no loginctl or no logind (a container, WSL without systemd)."""
    listed = run(["loginctl", "list-sessions", "--no-legend", "--no-pager"], LOGINCTL_TIMEOUT_S)
    ids = session_ids(listed or "")
    if not ids:
        return None
    shown = run(["loginctl", "show-session", "--no-pager", "-p", "Type", "-p", "IdleHint",
                 "-p", "IdleSinceHint", *ids], LOGINCTL_TIMEOUT_S)
    return None if shown is None else sessions_last_input(shown, now_s)


def last_input_s(now_s: float, run: Run = run_command) -> float | None:
    """When the owner last used a keyboard, mouse or terminal of this machine (Unix seconds), by
    the newest of the sources in this module's docstring; None: unknown."""
    times = [input_device_time(expand(INPUT_DEVICES)), terminal_time(expand(TERMINALS)),
             logind_last_input(now_s, run)]
    known = [seen for seen in times if seen is not None]
    return max(known) if known else None


def other_gpu_processes(run: Run = run_command, proc: Path = Path("/proc")) -> frozenset[int] | None:
    """The other processes (:func:`other_gpu_pids`) that compute on this machine's NVIDIA GPUs; None
    without a working nvidia-smi (none installed, an error, or over ``NVIDIA_SMI_TIMEOUT_S``)."""
    out = run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], NVIDIA_SMI_TIMEOUT_S)
    return None if out is None else other_gpu_pids(gpu_pids(out), os.getpid(), proc)
