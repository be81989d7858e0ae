"""The layout of a snapshot: its manifest (what a reader needs to rebuild and check it) and how
the parameters' bytes are laid out flat and cut into chunks. Reading and writing them in Redis is
:mod:`shared.snapshot`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from shared import PROTOCOL_VERSION
from shared.errors import ProtocolError, SnapshotError
from shared.protocol import MiB, check_protocol, require_field, unpack_limited

# Just under 4 MiB: Redis stores a value of exactly 4 MiB (plus its few bytes of header) in a
# 5 MiB allocation of jemalloc, so 4 MiB chunks cost ~1.25x their bytes in used_memory (measured:
# benchmarks/commit_memory.py --redis); 1 KiB less fits the 4 MiB size class. Readers take the
# chunk size from the manifest.
DEFAULT_CHUNK_BYTES = 4 * MiB - 1024
MAX_MANIFEST_BYTES = 8 * MiB
MAX_SNAPSHOT_BYTES = 8 * 1024 * MiB
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # bytes into the flat snapshot

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.tensor([], dtype=_DTYPES[self.dtype]).element_size()


@dataclass(frozen=True)
class SnapshotManifest:
    """Everything needed to rebuild and check one snapshot version.

    ``config`` is the run config (task name and settings, inner optimizer, DyLU, seed) so a client
    builds exactly the coordinator's model; ``progress`` is global progress (updates, steps, tokens).
    """

    run: str
    run_id: str
    version: int
    params: tuple[ParamEntry, ...]
    chunk_bytes: int
    chunk_sha256: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    def numel(self, name: str) -> int:
        return self.by_name[name].numel

    @property
    def by_name(self) -> dict[str, ParamEntry]:
        return {p.name: p for p in self.params}

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "protocol": PROTOCOL_VERSION,
                "type": "manifest",
                "run": self.run,
                "run_id": self.run_id,
                "version": self.version,
                "params": [[p.name, list(p.shape), p.dtype, p.offset] for p in self.params],
                "chunk_bytes": self.chunk_bytes,
                "chunk_sha256": list(self.chunk_sha256),
                "config": self.config,
                "progress": self.progress,
                "created_at": self.created_at,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> SnapshotManifest:
        obj = check_protocol(
            unpack_limited(data, max_bytes=MAX_MANIFEST_BYTES, max_items=100_000, max_str=4096)
        )
        if obj.get("type") != "manifest":
            raise ProtocolError("wrong_schema", "not a snapshot manifest")
        params = []
        offset = 0
        for item in require_field(obj, "params", list):
            if not (isinstance(item, list) and len(item) == 4):
                raise ProtocolError("wrong_schema", "bad parameter entry")
            name, shape, dtype, off = item
            if (
                not isinstance(name, str)
                or not isinstance(shape, list)
                or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)
                or not isinstance(dtype, str)  # a list/map here would make `in` raise TypeError
                or dtype not in _DTYPES
                or off != offset
            ):
                raise ProtocolError("wrong_schema", f"bad parameter entry {name!r}")
            entry = ParamEntry(name, tuple(shape), dtype, off)
            params.append(entry)
            offset += entry.nbytes
        manifest = cls(
            run=require_field(obj, "run", str),
            run_id=require_field(obj, "run_id", str),
            version=require_field(obj, "version", int),
            params=tuple(params),
            chunk_bytes=require_field(obj, "chunk_bytes", int),
            chunk_sha256=tuple(require_field(obj, "chunk_sha256", list)),
            config=require_field(obj, "config", dict),
            progress=require_field(obj, "progress", dict),
            created_at=float(require_field(obj, "created_at", (int, float))),
        )
        if manifest.chunk_bytes <= 0 or manifest.total_bytes > MAX_SNAPSHOT_BYTES:
            raise ProtocolError("wrong_schema", "bad chunk size or snapshot too large")
        if len(manifest.chunk_sha256) != math.ceil(manifest.total_bytes / manifest.chunk_bytes):
            raise ProtocolError("wrong_schema", "chunk count does not match the parameter bytes")
        return manifest


def byte_views(params: dict[str, torch.Tensor]) -> tuple[tuple[ParamEntry, ...], list[memoryview]]:
    """Parameter entries and, per tensor, its little-endian bytes (in the given order): a view of
    the tensor's own memory when it is a contiguous CPU tensor (the coordinator's θ is), so that
    nothing is copied. The flat snapshot is the views one after the other."""
    entries = []
    views = []
    offset = 0
    for name, tensor in params.items():
        t = tensor.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise SnapshotError(f"parameter {name} has unsupported dtype {dtype}")
        entry = ParamEntry(name, tuple(t.shape), dtype, offset)
        # reshape(-1): a 0-d tensor (a scalar parameter) cannot be viewed as bytes directly
        view = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
        views.append(view)
        offset += len(view)
        entries.append(entry)
    return tuple(entries), views


def flatten(params: dict[str, torch.Tensor]) -> tuple[tuple[ParamEntry, ...], bytes]:
    """Parameter entries and the flat little-endian bytes of ``params`` (in the given order)."""
    entries, views = byte_views(params)
    return entries, b"".join(views)


def chunked(views: list[memoryview], chunk_bytes: int) -> Iterator[memoryview | bytes]:
    """The flat bytes of ``views`` cut into ``chunk_bytes`` pieces (the last one shorter) without
    putting them together whole: a chunk inside one view is a slice of it (no copy), one across
    views is joined (one chunk's worth)."""
    pending: list[memoryview] = []
    size = 0
    for view in views:
        start = 0
        while start < len(view):
            take = min(chunk_bytes - size, len(view) - start)
            pending.append(view[start : start + take])
            size += take
            start += take
            if size == chunk_bytes:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


def unflatten(entries: tuple[ParamEntry, ...], flat: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: new tensors, shapes and dtypes from the trusted ``entries``."""
    return tensors_over(entries, bytearray(flat))  # a copy of its own, writable


def tensors_over(entries: tuple[ParamEntry, ...], buffer: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of ``entries`` as views of ``buffer`` (no copy: they keep it alive, and each
    owns its own bytes of it), shapes and dtypes from the trusted ``entries``."""
    out = {}
    for e in entries:
        if e.offset + e.nbytes > len(buffer):
            raise SnapshotError(f"snapshot bytes end before parameter {e.name}")
        if e.numel == 0:  # torch.frombuffer refuses count=0
            out[e.name] = torch.empty(e.shape, dtype=_DTYPES[e.dtype])
            continue
        t = torch.frombuffer(buffer, dtype=_DTYPES[e.dtype], count=e.numel, offset=e.offset)
        out[e.name] = t.reshape(e.shape)
    return out
