"""Small files written so that a crash leaves either the old or the new content whole, and the
one place both sides keep their state by default."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/asyncloco`` if that variable is set, else ``~/.local/state/asyncloco``.

    The client keeps its id and sequence numbers here, the coordinator its checkpoints (under
    ``coordinator/RUN``). The CLIs call this for their defaults; nothing below them does.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "asyncloco"


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (not possible on every platform)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def make_directory(path: Path) -> None:
    """Create ``path`` and any missing parents so that they survive a power loss.

    A new directory is an entry in its parent, durable only once the parent is fsynced (without
    it, a crash of the machine can take the directory away with every fsynced file in it). So
    each directory made here is followed by an fsync of its parent. An existing ``path`` is left
    as it is (no fsync).
    """
    missing = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)  # raises if a file is in the way
        fsync_directory(directory.parent)


def write_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file whole.

    ``mode`` (e.g. ``0o600`` for a private key) is set on the temporary file before any byte is
    written to it, so the data is never readable under looser permissions, not even for a moment.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)  # a leftover temporary file keeps its old mode through O_CREAT
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def append_line_durably(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` and fsync it before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
