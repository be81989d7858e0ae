"""Snapshot layout without Redis: flatten/unflatten and the manifest's encode/decode."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import msgpack
import pytest
import torch

from shared.errors import ProtocolError, SnapshotError
from shared.snapshot_layout import ParamEntry, SnapshotManifest, byte_views, chunked, flatten, unflatten


def mixed_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(7, 5, generator=gen),
        "scale": torch.tensor(1.5),  # a 0-d scalar
        "half": torch.randn(3, generator=gen).to(torch.float16),
        "brain": torch.randn(2, 3, 4, generator=gen).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "last": torch.randn(1, generator=gen),
    }


def test_flatten_unflatten_round_trip() -> None:
    params = mixed_params()
    entries, flat = flatten(params)
    restored = unflatten(entries, flat)
    assert list(restored) == list(params)  # order kept
    for name, tensor in params.items():
        assert restored[name].dtype == tensor.dtype
        assert restored[name].shape == tensor.shape
        assert torch.equal(restored[name], tensor)


def test_flatten_layout_is_contiguous_little_endian() -> None:
    params = mixed_params()
    entries, flat = flatten(params)
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2}
    offset = 0
    for entry, tensor in zip(entries, params.values(), strict=True):
        assert entry.offset == offset
        assert entry.nbytes == tensor.numel() * sizes[entry.dtype]
        offset += entry.nbytes
    assert len(flat) == offset
    assert flat[entries[1].offset : entries[1].offset + 4] == b"\x00\x00\xc0\x3f"  # 1.5f, LE


def test_unflatten_copies() -> None:
    entries, flat = flatten({"w": torch.ones(4)})
    restored = unflatten(entries, flat)
    restored["w"].add_(1)
    assert torch.equal(unflatten(entries, flat)["w"], torch.ones(4))


def test_flatten_refuses_other_dtypes() -> None:
    with pytest.raises(SnapshotError, match="unsupported dtype"):
        flatten({"steps": torch.arange(3)})


@pytest.mark.parametrize("chunk_bytes", [1, 3, 4, 64, 80, 10_000])
def test_chunks_cut_from_the_tensors_are_the_flat_bytes_cut(chunk_bytes: int) -> None:
    params = mixed_params()
    entries, views = byte_views(params)
    _, flat = flatten(params)
    assert entries == flatten(params)[0]
    chunks = [bytes(c) for c in chunked(views, chunk_bytes)]
    assert chunks == [flat[i : i + chunk_bytes] for i in range(0, len(flat), chunk_bytes)]


def test_a_chunk_inside_one_tensor_is_a_view_of_it_not_a_copy() -> None:
    w = torch.zeros(64)  # 256 bytes: four chunks of 64, all inside w
    _, views = byte_views({"w": w})
    chunks = list(chunked(views, 64))
    assert len(chunks) == 4 and all(isinstance(c, memoryview) for c in chunks)
    w[0] = 1.5
    assert bytes(chunks[0][:4]) == b"\x00\x00\xc0\x3f"  # sees the tensor's memory


def test_no_params_no_chunks() -> None:
    assert list(chunked(byte_views({})[1], 64)) == []
    assert list(chunked(byte_views({"e": torch.zeros(0)})[1], 64)) == []


def test_unflatten_refuses_short_bytes() -> None:
    entries, flat = flatten({"a": torch.ones(3), "b": torch.ones(2)})
    with pytest.raises(SnapshotError, match="before parameter b"):
        unflatten(entries, flat[:-1])


def make_manifest(chunk_bytes: int = 64) -> SnapshotManifest:
    entries, flat = flatten(mixed_params())
    chunks = [flat[i : i + chunk_bytes] for i in range(0, len(flat), chunk_bytes)]
    return SnapshotManifest(
        run="default",
        run_id="run-1",
        version=7,
        params=entries,
        chunk_bytes=chunk_bytes,
        chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
        config={"task": {"name": "bytelm", "settings": {"model_size": "tiny"}}, "seed": 0},
        progress={"updates": 3, "tokens": 12_345},
        created_at=1_700_000_000.25,
    )


def test_manifest_round_trip() -> None:
    manifest = make_manifest()
    decoded = SnapshotManifest.decode(manifest.encode())
    assert decoded == manifest
    assert decoded.total_bytes == len(flatten(mixed_params())[1])
    assert len(decoded.chunk_sha256) == math.ceil(decoded.total_bytes / 64)
    assert decoded.numel("brain") == 24
    assert decoded.by_name["scale"] == ParamEntry("scale", (), "float32", decoded.by_name["scale"].offset)


def manifest_dict(**changes: Any) -> dict[str, Any]:
    obj = msgpack.unpackb(make_manifest().encode(), raw=False)
    obj.update(changes)
    return obj


def reason_of(obj: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        SnapshotManifest.decode(msgpack.packb(obj, use_bin_type=True))
    return info.value.reason


@pytest.mark.parametrize("delta", [-1, 1])
def test_manifest_rejects_wrong_chunk_count(delta: int) -> None:
    hashes = manifest_dict()["chunk_sha256"]
    hashes = hashes[:-1] if delta < 0 else [*hashes, "0" * 64]
    assert reason_of(manifest_dict(chunk_sha256=hashes)) == "wrong_schema"


def test_manifest_rejects_non_contiguous_offsets() -> None:
    params = manifest_dict()["params"]
    params[2][3] += 2  # a gap
    assert reason_of(manifest_dict(params=params)) == "wrong_schema"
    params = manifest_dict()["params"]
    params[1], params[2] = params[2], params[1]  # overlapping / out of order
    assert reason_of(manifest_dict(params=params)) == "wrong_schema"


@pytest.mark.parametrize("dtype", ["int64", "float64", "", ["float32"], {"a": 1}, None])
def test_manifest_rejects_unknown_dtype(dtype: Any) -> None:
    params = manifest_dict()["params"]
    params[0][2] = dtype
    assert reason_of(manifest_dict(params=params)) == "wrong_schema"


@pytest.mark.parametrize(
    "entry",
    [["w", [2], "float32"], "w", ["w", "2", "float32", 0], ["w", [-1], "float32", 0], [1, [2], "float32", 0]],
)
def test_manifest_rejects_bad_entries(entry: Any) -> None:
    assert reason_of(manifest_dict(params=[entry], chunk_sha256=["0" * 64])) == "wrong_schema"


@pytest.mark.parametrize(
    "changes",
    [{"type": "delta"}, {"chunk_bytes": 0}, {"version": "7"}, {"config": []}, {"protocol": 99}],
)
def test_manifest_rejects_bad_fields(changes: dict[str, Any]) -> None:
    assert reason_of(manifest_dict(**changes)) in {"wrong_schema", "protocol_version"}


def test_manifest_rejects_absurd_size() -> None:
    huge = [["w", [2**30, 2**30], "float32", 0]]
    assert reason_of(manifest_dict(params=huge, chunk_sha256=[])) == "wrong_schema"
