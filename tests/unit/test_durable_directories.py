"""New directories outlive a power loss: each is followed by an fsync of its parent (real files).

A directory is an entry in its parent; until the parent is fsynced, a machine crash can take the
new directory away together with every file fsynced inside it. Each test records the fsyncs the
code makes (the path of the descriptor and, for a directory, what it held at that moment) and
checks that the parent was fsynced once it held the new directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from coordinator.checkpoint import Checkpoint, prepare_directory, save_checkpoint
from coordinator.parts import PartSpool, SpoolConfig
from shared.delta_parts import split_delta
from shared.files import make_directory

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")

Fsyncs = list[tuple[Path, set[str]]]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Fsyncs:
    """Every os.fsync from now on: (path, entries of that directory then; empty for a file)."""
    seen: Fsyncs = []
    real = os.fsync

    def recording(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        seen.append((path, set(os.listdir(path)) if path.is_dir() else set()))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def synced_holding(fsyncs: Fsyncs, directory: Path, name: str) -> bool:
    """Whether ``directory`` was fsynced at a moment when it held ``name``."""
    return any(path == directory.resolve() and name in entries for path, entries in fsyncs)


def test_make_directory_fsyncs_the_parent_of_every_directory_it_makes(tmp_path: Path, fsyncs: Fsyncs) -> None:
    make_directory(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert synced_holding(fsyncs, tmp_path, "a")
    assert synced_holding(fsyncs, tmp_path / "a", "b")
    assert synced_holding(fsyncs, tmp_path / "a" / "b", "c")
    fsyncs.clear()
    make_directory(tmp_path / "a" / "b")  # there already: nothing to make durable
    assert fsyncs == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_directory(tmp_path / "file")


def test_the_spool_directory_is_made_durably(tmp_path: Path, fsyncs: Fsyncs) -> None:
    spool = PartSpool(tmp_path / "ckpt" / "parts", SpoolConfig())
    spool.recover(1000.0)
    assert synced_holding(fsyncs, tmp_path, "ckpt")
    assert synced_holding(fsyncs, tmp_path / "ckpt", "parts")


def test_a_spool_directory_left_by_a_crash_is_synced_at_recovery(tmp_path: Path, fsyncs: Fsyncs) -> None:
    (tmp_path / "parts").mkdir()  # made by a process that died before any fsync
    PartSpool(tmp_path / "parts", SpoolConfig()).recover(1000.0)
    assert synced_holding(fsyncs, tmp_path, "parts")


def test_a_spooled_part_is_durable_with_its_delta_directory(tmp_path: Path, fsyncs: Fsyncs) -> None:
    spool = PartSpool(tmp_path / "parts", SpoolConfig())
    spool.recover(1000.0)
    fsyncs.clear()
    parts = split_delta(b"x" * 20, part_bytes=8, run_id="r", client_id="c1", seq=5)
    result = spool.add(parts[0], 1000.0)
    assert result.key == "c1~5"
    # the delta's directory in the spool, then its meta and the part file in the delta's directory
    assert synced_holding(fsyncs, tmp_path / "parts", "c1~5")
    assert synced_holding(fsyncs, tmp_path / "parts" / "c1~5", "meta.json")
    assert synced_holding(fsyncs, tmp_path / "parts" / "c1~5", "0@0.part")


def test_a_new_checkpoint_directory_is_made_durably(tmp_path: Path, fsyncs: Fsyncs) -> None:
    save_checkpoint(tmp_path / "runs" / "r1", Checkpoint(tensors={"w": torch.ones(4)}, state={"version": 1}))
    assert synced_holding(fsyncs, tmp_path, "runs")
    assert synced_holding(fsyncs, tmp_path / "runs", "r1")
    assert synced_holding(fsyncs, tmp_path / "runs" / "r1", "checkpoint.safetensors")
    prepare_directory(tmp_path / "other" / "r2")
    assert synced_holding(fsyncs, tmp_path, "other")
    assert synced_holding(fsyncs, tmp_path / "other", "r2")
