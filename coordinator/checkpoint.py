"""Checkpoints on disk: written whole or not at all.

One file ``checkpoint.safetensors`` per run directory: the outer optimizer's tensors (θ, m, Δ) with
all other state (version, run config, per-client sequence windows, counters, eval history) as JSON
in the safetensors metadata. Written to a temporary file, fsynced, renamed over the old one and the
directory fsynced, so a crash at any instant leaves either the old or the new checkpoint.
``--fresh`` sets an old run's checkpoint and applied log aside (:func:`set_aside`) rather than
deleting them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from coordinator.applied_log import FILENAME as APPLIED_LOG
from shared.errors import ConfigError
from shared.files import fsync_directory

FILENAME = "checkpoint.safetensors"
FORMAT = 1


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]  # JSON-able

    @property
    def version(self) -> int:
        return int(self.state["version"])


def checkpoint_path(directory: Path) -> Path:
    return directory / FILENAME


def save_checkpoint(
    directory: Path, checkpoint: Checkpoint, *, on_partial: Callable[[], None] | None = None
) -> Path:
    """Atomically replace the checkpoint in ``directory`` (temp file, fsync, rename, fsync dir).

    ``on_partial`` (fault tests only) is called when half of the temp file is written and flushed,
    before the rest, the fsync and the rename: a crash there must leave the old checkpoint intact.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(checkpoint.state, format=FORMAT)
    data = save(
        {k: t.contiguous() for k, t in checkpoint.tensors.items()},
        metadata={"asyncloco": json.dumps(state)},
    )
    final = checkpoint_path(directory)
    tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        if on_partial is not None:
            half = len(data) // 2
            fh.write(data[:half])
            fh.flush()
            on_partial()
            data = data[half:]
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    # A coordinator killed mid-write left its temp file (another pid in the name); the run's lease
    # means no other process writes here now, so any such file is garbage.
    for stale in directory.glob(f".{FILENAME}.*.tmp"):
        stale.unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


# Keys every checkpoint's state has; one without them is not a checkpoint this code wrote.
REQUIRED_STATE = ("version",)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none; a ConfigError (one line) for a
    file that is not a whole checkpoint of this format."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        state = json.loads(metadata["asyncloco"])
        if not isinstance(state, dict):
            raise TypeError("its state is not a JSON object")
        missing = [key for key in REQUIRED_STATE if key not in state]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"checkpoint {path} is unreadable ({reason}); put a good copy in its place, "
                          "or pass --fresh to set it aside and start a new run") from exc
    if state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}")
    return Checkpoint(tensors=tensors, state=state)


def prepare_directory(directory: Path) -> None:
    """Create the checkpoint directory if missing and make sure files can be written in it; a
    ConfigError (one line) if not: a path through a file, no permission, a read-only file system."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--checkpoint-dir {directory} is a file, not a directory")
    probe = directory / f".write-test.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--checkpoint-dir {directory}: cannot create it or write in it "
                          f"({exc.strerror or exc})") from exc


def set_aside(directory: Path, *, now: float | None = None) -> Path | None:
    """Rename the run's checkpoint and applied log in ``directory`` out of the way; for ``--fresh``.

    ``checkpoint.safetensors`` becomes ``checkpoint.<unix>.old`` and ``applied.jsonl`` becomes
    ``applied.<unix>.jsonl.old`` (``<unix>``: ``now``, default the current time, in whole seconds;
    a later second if that name is taken, so an earlier set-aside is never overwritten). The applied
    log goes aside even without a checkpoint: its lines belong to the old run either way. Returns
    the checkpoint's new path, or None if there was no checkpoint.
    """
    checkpoint = checkpoint_path(directory)
    applied = directory / APPLIED_LOG
    stamp = int(time.time() if now is None else now)

    def targets(unix: int) -> tuple[Path, Path]:
        return directory / f"checkpoint.{unix}.old", directory / f"applied.{unix}.jsonl.old"

    while any(target.exists() for target in targets(stamp)):
        stamp += 1
    checkpoint_aside, applied_aside = targets(stamp)
    moved = None
    if checkpoint.exists():
        checkpoint.rename(checkpoint_aside)
        moved = checkpoint_aside
    if applied.exists():
        applied.rename(applied_aside)
    if directory.exists():
        fsync_directory(directory)
    return moved
