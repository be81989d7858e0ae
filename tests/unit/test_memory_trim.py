"""After a large piece of work the coordinator hands freed memory back (coordinator.memory_trim):
memory freed between blocks still in use stays in the process until then."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: the heap of a test process that ran other tests before (a pytest-xdist
# worker's) holds free memory of its own, which changes what the blocks below reuse and release.
SCENARIO = textwrap.dedent("""
    from coordinator.memory_trim import trim

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    freed, kept = [], []
    for _ in range(2000):  # 128 MB in blocks malloc takes from the heap, each pinned by a small one
        freed.append(bytearray(64 * 1024))
        kept.append(bytearray(2000))
    del freed
    held = rss()
    trimmed = trim()
    print(trimmed, held - rss(), len(kept))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_memory_freed_between_live_blocks_goes_back_to_the_system() -> None:
    result = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=60,
                            check=True)
    trimmed, released, kept = result.stdout.split()
    assert trimmed == "True"
    assert int(released) > 100 * 1024 * 1024, result.stdout
    assert kept == "2000"
