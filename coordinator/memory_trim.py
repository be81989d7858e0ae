"""Hand freed memory back to the operating system after a large piece of work.

glibc's allocator keeps memory a process freed for its next allocations; after a delta of a 100M
model is judged (a message, its decode and the checks' temporaries, several hundred MB), it kept
up to 1.7 × the model's bytes (``benchmarks/coordinator_memory.py``), so RSS wandered far above
what is alive. :func:`trim` asks glibc (``malloc_trim``) to give it back. Elsewhere (macOS, musl)
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_LIBC: Any = None  # glibc, once loaded; False where there is none


def trim() -> bool:
    """``malloc_trim(0)``; True if glibc released something."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC is False:
        return False
    return bool(_LIBC.malloc_trim(0))
