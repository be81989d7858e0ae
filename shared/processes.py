"""Whether a process is alive, the way a supervisor means it: a zombie has exited.

``os.kill(pid, 0)`` succeeds for a zombie (a child that exited and that its parent has not
waited for yet), so a lease whose holder was SIGKILLed by its own parent would look held until
the parent reaps it. On Linux the state letter in ``/proc/PID/stat`` tells a zombie apart; where
there is no ``/proc`` (macOS) the ``kill(pid, 0)`` answer is the best there is.
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and has not exited (a zombie counts as dead).

    A process of another user (``PermissionError`` from ``kill``) is alive. ``pid`` ≤ 0 names a
    process group, not a process, and is never alive.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else: still ask /proc whether it is a zombie
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        # /proc exists but the pid is gone (it was reaped since kill) → dead; no /proc at all → alive
        return not Path("/proc/self").exists()
    except OSError:
        return True
    # "PID (comm) S ...": comm may itself hold ") ", so the state is the field after the last ")"
    fields = stat.rpartition(")")[2].split()
    return not fields or fields[0] != "Z"
