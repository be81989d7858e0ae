"""After a large piece of work the coordinator hands freed memory back (coordinator.memory_trim):
memory freed between blocks still in use stays in the process until then."""

from __future__ import annotations

import sys

import pytest

from coordinator.memory_trim import trim


def _rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_memory_freed_between_live_blocks_goes_back_to_the_system() -> None:
    freed, kept = [], []
    for _ in range(2000):  # 128 MB in blocks malloc takes from the heap, each pinned by a small one
        freed.append(bytearray(64 * 1024))
        kept.append(bytearray(2000))
    del freed
    held = _rss()
    assert trim()
    assert held - _rss() > 100 * 1024 * 1024, (held, _rss())
    assert len(kept) == 2000
