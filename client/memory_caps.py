"""How much memory the client may take: ``--max-memory`` and ``--max-gpu-memory``.

* ``--max-memory GB``: this process's resident memory (RSS: ``/proc/self/statm`` on Linux; where
  there is none, the peak RSS from :mod:`resource`, which never falls) is checked between training
  steps, where the pause rules are asked (:mod:`client.politeness`). Over the cap, the round in
  hand is abandoned as a pause would abandon it (no delta is sent for it), it is said why, and the
  next round starts at once: waiting would not give the memory back. Most of it is the run's
  model, its optimizer state and a batch of activations, so if every round is abandoned, the fix
  is a smaller model or batch (the run's: its operator's ``--batch-size``) or a higher cap.
* ``--max-gpu-memory FRACTION``: on CUDA, torch's allocator is held to that fraction of the
  device's memory (``torch.cuda.set_per_process_memory_fraction``); a step that needs more fails
  with CUDA's out-of-memory error, which ends the client (it is not turned into an abandoned
  round). On the CPU or MPS it is ignored, with one warning line.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from client.stop import RoundAbandoned
from shared.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports this module before torch
    import torch

log = logging.getLogger(__name__)

GIB = 1024**3  # --max-memory's GB, as systemd's MemoryMax=4G and `free -g` count
STATM = Path("/proc/self/statm")


@dataclass(frozen=True)
class MemoryCaps:
    """``max_rss_bytes``: the most resident memory this process may use before a round is
    abandoned; ``max_gpu_fraction``: the share of the CUDA device's memory torch may allocate.
    0 means no cap, for both."""

    max_rss_bytes: int = 0
    max_gpu_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.max_rss_bytes < 0:
            raise ConfigError(f"--max-memory must be >= 0 GB (0: no cap), got {self.max_rss_bytes / GIB:g}")
        if not (math.isfinite(self.max_gpu_fraction) and 0 <= self.max_gpu_fraction <= 1):
            raise ConfigError(f"--max-gpu-memory must be a fraction within 0..1 (0: no cap), got "
                              f"{self.max_gpu_fraction}")


class OverMemory(RoundAbandoned):
    """A round abandoned because this process passed ``--max-memory``: the worker says so and goes
    on with the next round at once (there is nothing to wait for, unlike a pause)."""

    waits = False


def rss_from_statm(statm: str, page_bytes: int) -> int:
    """Resident bytes from ``/proc/PID/statm``'s text: its second field, in pages of ``page_bytes``."""
    return int(statm.split()[1]) * page_bytes


def current_rss_bytes(statm: Path = STATM) -> int | None:
    """This process's resident memory in bytes (Linux); elsewhere its peak, which :mod:`resource`
    gives in KiB on Linux and in bytes on macOS; None where neither can be read (Windows)."""
    try:
        return rss_from_statm(statm.read_text(), os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover (Windows)
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def over_memory_reason(rss_bytes: int | None, max_rss_bytes: int) -> str | None:
    """Why the round must end (one line), if ``rss_bytes`` is known and over a cap of
    ``max_rss_bytes`` (0: none); else None."""
    if not max_rss_bytes or rss_bytes is None or rss_bytes <= max_rss_bytes:
        return None
    return (f"this client uses {rss_bytes / GIB:.2f} GB of memory, over --max-memory "
            f"{max_rss_bytes / GIB:g} GB (if every round ends so, a smaller model or batch is the fix: the "
            "run's operator sets them; or raise --max-memory)")


class MemoryGuard:
    """Checks ``caps`` between training steps; ``rss_bytes`` reads this process's resident memory."""

    def __init__(self, caps: MemoryCaps, rss_bytes: Callable[[], int | None] = current_rss_bytes) -> None:
        self.caps = caps
        self.rss_bytes = rss_bytes
        self._unknown_said = False

    def check(self, *, steps: int, elapsed_s: float) -> None:
        """Raise :class:`OverMemory` (``steps`` and ``elapsed_s`` of the round in hand) if this
        process is over ``--max-memory``; say once if its memory cannot be read here."""
        if not self.caps.max_rss_bytes:
            return
        rss = self.rss_bytes()
        if rss is None and not self._unknown_said:
            self._unknown_said = True
            log.warning("--max-memory is ignored: this platform does not say how much memory a process uses")
        reason = over_memory_reason(rss, self.caps.max_rss_bytes)
        if reason is not None:
            raise OverMemory(reason, steps=steps, elapsed_s=elapsed_s)


def cap_gpu_memory(device: torch.device, fraction: float) -> bool:
    """Hold torch's CUDA allocator on ``device`` to ``fraction`` of its memory (0: leave it alone);
    on any other device warn once that ``--max-gpu-memory`` is ignored. True if a cap was set."""
    if not fraction:
        return False
    if device.type != "cuda":
        log.warning("--max-gpu-memory %g is ignored: it caps CUDA memory, and this client trains on %s",
                    fraction, device.type)
        return False
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return True
