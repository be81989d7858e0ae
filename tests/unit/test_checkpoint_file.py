"""The checkpoint file, streamed from the tensors: the same safetensors bytes as before, loadable
both ways, and no serialized copy of the state in memory while it is written."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save

from coordinator.checkpoint import (
    FORMAT,
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    write_safetensors,
)


def optimizer_tensors(n: int = 1000) -> dict[str, torch.Tensor]:
    """Like RunState.checkpoint()'s: θ, momentum and buffer per parameter, float32."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for prefix in ("param/", "momentum/", "accum/"):
        out[prefix + "emb.weight"] = torch.randn(n // 10, 10, generator=gen)
        out[prefix + "bias"] = torch.randn(7, generator=gen)
        out[prefix + "scale"] = torch.randn((), generator=gen)  # a 0-d tensor
        out[prefix + "none"] = torch.zeros(0, 3)
    return out


def test_the_file_is_what_safetensors_save_writes(tmp_path: Path) -> None:
    tensors = optimizer_tensors()
    state = {"version": 7, "run": "r", "odd": 'quote " backslash \\ newline \n ctrl \x01 é'}
    save_checkpoint(tmp_path, Checkpoint(tensors=tensors, state=state))
    expected = save(tensors, metadata={"asyncloco": json.dumps(dict(state, format=FORMAT))})
    assert checkpoint_path(tmp_path).read_bytes() == expected


def test_a_checkpoint_of_the_old_writer_loads(tmp_path: Path) -> None:
    tensors = optimizer_tensors()
    state = {"version": 3, "format": FORMAT}
    checkpoint_path(tmp_path).write_bytes(save(tensors, metadata={"asyncloco": json.dumps(state)}))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.version == 3
    assert all(torch.equal(loaded.tensors[k], v) for k, v in tensors.items())


def test_mixed_dtypes_round_trip_through_safetensors_readers(tmp_path: Path) -> None:
    tensors = {"h": torch.randn(3).half(), "i": torch.arange(5), "f": torch.randn(2, 2),
               "b": torch.tensor([True, False, True]), "bf": torch.randn(5).bfloat16(),
               "u": torch.arange(4, dtype=torch.uint8)}
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as fh:
        written = write_safetensors(fh, tensors, {"k": "v"})
    assert written == path.stat().st_size
    for back in (load_file(path), load(path.read_bytes())):
        assert set(back) == set(tensors)
        assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_on_half_is_called_once_at_exactly_half_the_file() -> None:
    tensors = optimizer_tensors()
    whole = io.BytesIO()
    total = write_safetensors(whole, tensors, {"a": "b"})
    seen: list[bytes] = []
    fh = io.BytesIO()
    write_safetensors(fh, tensors, {"a": "b"}, on_half=lambda: seen.append(fh.getvalue()))
    assert len(seen) == 1 and len(seen[0]) == total // 2
    assert seen[0] == whole.getvalue()[: total // 2] and fh.getvalue() == whole.getvalue()


def test_writing_makes_no_copy_of_the_state(tmp_path: Path) -> None:
    # 3 × 4 MB of float32; the old writer (safetensors save() then bytes()) held the whole file as
    # Python bytes: tracemalloc, which sees every Python allocation, would count 12 MB or more.
    tensors = {f"{p}/w": torch.randn(1_000_000) for p in ("param", "momentum", "accum")}
    save_checkpoint(tmp_path, Checkpoint(tensors=tensors, state={"version": 1}))  # warm up
    tracemalloc.start()
    try:
        save_checkpoint(tmp_path, Checkpoint(tensors=tensors, state={"version": 2}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated while writing a 12 MB checkpoint"
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.version == 2
    assert all(torch.equal(loaded.tensors[k], v) for k, v in tensors.items())


def test_a_dtype_safetensors_cannot_store_is_refused_before_writing() -> None:
    fh = io.BytesIO()
    with pytest.raises(TypeError, match="dtype"):
        write_safetensors(fh, {"c": torch.tensor([1 + 2j])}, {})
    assert fh.getvalue() == b""
