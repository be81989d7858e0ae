"""Byte corpora: the Python standard library's own sources by default, or any text files.

The corpus is cut into fixed blocks; every 20th block is held out for evaluation, the rest are dealt
round-robin into ``num_shards`` training shards. So each shard is a spread-out, deterministic slice of
the whole corpus (close to i.i.d.), and held-out text is never trained on.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import TaskError

BLOCK_BYTES = 64 * 1024
HOLDOUT_EVERY = 20  # block i is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
STDLIB = "stdlib"


def stdlib_files() -> list[Path]:
    """The ``.py`` files of this interpreter's standard library, without installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in ("site-packages", "dist-packages") for p in parts):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def resolve_files(data: str) -> list[Path]:
    """Files named by ``data``: ``"stdlib"`` or a glob (``**`` allowed, ``~`` expanded)."""
    if data == STDLIB:
        files = stdlib_files()
    else:
        pattern = os.path.expanduser(data)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise TaskError(f"no files match --data {data!r}")
    return files


@dataclass
class ByteCorpus:
    """The held-out bytes and the training shards of one corpus, as uint8 tensors."""

    heldout: torch.Tensor  # (n_heldout_bytes,) uint8
    shards: list[torch.Tensor]  # num_shards × (n_shard_bytes,) uint8

    @classmethod
    def load(cls, data: str, *, num_shards: int, max_bytes: int) -> ByteCorpus:
        raw = bytearray()
        for path in resolve_files(data):
            try:
                raw += path.read_bytes()
            except OSError:
                continue  # unreadable file: skip, the corpus stays deterministic per machine
            raw += b"\n\n"
            if len(raw) >= max_bytes:
                del raw[max_bytes:]
                break
        if len(raw) < 2 * BLOCK_BYTES:
            raise TaskError(f"corpus {data!r} has only {len(raw)} bytes; need at least 128 KiB")
        blocks = [bytes(raw[i : i + BLOCK_BYTES]) for i in range(0, len(raw), BLOCK_BYTES)]
        heldout = [b for i, b in enumerate(blocks) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
        train = [b for i, b in enumerate(blocks) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        if not heldout:
            heldout = [train.pop()]
        shards = [b"".join(train[s::num_shards]) or train[0] for s in range(num_shards)]
        return cls(heldout=_to_tensor(b"".join(heldout)), shards=[_to_tensor(s) for s in shards])


def _to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def random_windows(
    data: torch.Tensor, *, length: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches of random windows, each (batch_size, length) int64 byte values."""
    if data.numel() <= length + 1:
        raise TaskError(f"text of {data.numel()} bytes is shorter than a window of {length}")
    high = data.numel() - length
    offsets = torch.arange(length)
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        yield data[starts[:, None] + offsets[None, :]].long()  # (B, length)
