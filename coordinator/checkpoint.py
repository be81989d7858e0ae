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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from coordinator.applied_log import FILENAME as APPLIED_LOG
from shared.errors import CheckpointUnusable
from shared.files import fsync_directory, make_directory

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

    The file is streamed from the tensors' own memory (:func:`write_safetensors`), so a commit
    needs no second copy of the optimizer's state: its memory peak is the steady one plus a few
    buffers, whatever the model's size.

    ``on_partial`` (fault tests only) is called when half of the temp file is written and flushed,
    before the rest, the fsync and the rename: a crash there must leave the old checkpoint intact.
    """
    if not directory.is_dir():
        make_directory(directory)
    state = dict(checkpoint.state, format=FORMAT)
    final = checkpoint_path(directory)
    tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        write_safetensors(fh, checkpoint.tensors, {"asyncloco": json.dumps(state)}, on_half=on_partial)
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


# safetensors' names of the dtypes a checkpoint may hold
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of ``tensor``: a view of its own memory when it is a contiguous CPU
    tensor (a checkpoint's always are), no copy."""
    t = tensor.detach().to("cpu").contiguous()
    if not t.numel():
        return memoryview(b"")
    # reshape(-1): a 0-d tensor cannot be viewed as bytes directly
    return t.reshape(-1).view(torch.uint8).numpy().data


def safetensors_header(tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header of a safetensors file of ``tensors`` (its 8-byte length included) and the order
    in which their bytes follow it.

    Laid out as safetensors' own writer does: tensors sorted by element size, largest first (each
    then starts aligned), then by name; the JSON without spaces, ``__metadata__`` first, padded
    with spaces to a multiple of 8 bytes. For tensors of one dtype (a checkpoint's are float32)
    the file is byte for byte what ``safetensors.torch.save`` writes; for mixed dtypes the order
    may differ, which every reader accepts (offsets are explicit).
    """
    if sys.byteorder != "little":  # the tensors' bytes are written as they are in memory
        raise NotImplementedError("checkpoints are little-endian; this machine is big-endian")
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"checkpoint tensor {name} has dtype {tensor.dtype}, not one safetensors stores")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(fh: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                      on_half: Callable[[], None] | None = None) -> int:
    """Write ``tensors`` and ``metadata`` to ``fh`` as a safetensors file, one tensor at a time
    from its own memory (no serialized copy of the whole file, as ``safetensors.torch.save``
    makes); returns the bytes written.

    ``on_half``: called once, when exactly half of the file's bytes are written and flushed.
    """
    header, order = safetensors_header(tensors, metadata)
    pieces = [memoryview(header)] + [_raw_bytes(tensors[name]) for name in order]
    total = sum(len(p) for p in pieces)
    half = total // 2 if on_half is not None else -1
    written = 0
    for piece in pieces:
        if written < half <= written + len(piece):
            cut = half - written
            fh.write(piece[:cut])
            fh.flush()
            assert on_half is not None
            on_half()
            piece, written = piece[cut:], written + cut
        fh.write(piece)
        written += len(piece)
    return written


# Keys every checkpoint's state has; one without them is not a checkpoint this code wrote.
REQUIRED_STATE = ("version",)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none; a CheckpointUnusable (one line,
    exit 65) for a file that is not a whole checkpoint of this format."""
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
        raise CheckpointUnusable(f"checkpoint {path} is unreadable ({reason}); put a good copy in its "
                                 "place, or pass --fresh to set it aside and start a new run") from exc
    if state.get("format") != FORMAT:
        raise CheckpointUnusable(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}")
    return Checkpoint(tensors=tensors, state=state)


def prepare_directory(directory: Path) -> None:
    """Create the checkpoint directory if missing and make sure files can be written in it; a
    CheckpointUnusable (one line, exit 65) if not: a path through a file, no permission, a
    read-only file system."""
    if directory.exists() and not directory.is_dir():
        raise CheckpointUnusable(f"--checkpoint-dir {directory} is a file, not a directory")
    probe = directory / f".write-test.{os.getpid()}"
    try:
        make_directory(directory)  # a new one durably: its parent fsynced
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointUnusable(f"--checkpoint-dir {directory}: cannot create it or write in it "
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
