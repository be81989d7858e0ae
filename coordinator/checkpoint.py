"""Checkpoints on disk: written whole or not at all.

One file ``checkpoint.safetensors`` per run directory: the outer optimizer's tensors (θ, m, Δ) with
all other state (version, run config, per-client sequence windows, counters, eval history) as JSON
in the safetensors metadata. Written to a temporary file, fsynced, renamed over the old one and the
directory fsynced, so a crash at any instant leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from shared.errors import ConfigError

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


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        state = json.loads(metadata["asyncloco"])
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from exc
    if state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}")
    return Checkpoint(tensors=tensors, state=state)
