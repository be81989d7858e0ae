"""The pieces behind the kill -9 promises, without servers: crash points, the applied log, and a
checkpoint write interrupted half way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.applied_log import AppliedLog, read_applied_log
from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.faults import POINTS, CrashPoints, parse_crash_at
from shared.errors import ConfigError


class Crashed(Exception):
    pass


def test_parse_crash_at_defaults_to_the_first_pass_and_refuses_unknown_points() -> None:
    assert parse_crash_at("after_ack") == ("after_ack", 1)
    assert parse_crash_at("mid_snapshot:3") == ("mid_snapshot", 3)
    for bad in ("nowhere", "after_ack:0", "after_ack:x", "after_ack:-1"):
        with pytest.raises(ConfigError):
            parse_crash_at(bad)


def test_crash_points_exit_on_the_chosen_pass_only(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise Crashed

    monkeypatch.setattr("coordinator.faults.os._exit", fake_exit)
    points = CrashPoints("after_apply:2")
    points.hit("after_ack")
    points.hit("after_apply")
    assert exits == []
    with pytest.raises(Crashed):
        points.hit("after_apply")
    assert exits == [137]
    inert = CrashPoints(None)
    for point in POINTS:
        inert.hit(point)  # no crash point configured: nothing happens


def test_applied_log_is_cut_back_to_the_committed_length(tmp_path: Path) -> None:
    log = AppliedLog(tmp_path)
    log.reset(0)
    committed = log.append([{"id": "a:0", "outcome": "applied", "reason": "", "version": 1}])
    log.append([{"id": "a:1", "outcome": "applied", "reason": "", "version": 2}])  # never committed
    with open(tmp_path / "applied.jsonl", "ab") as fh:
        fh.write(b'{"id": "a:2", "outc')  # a torn write of a crashed process
    resumed = AppliedLog(tmp_path)
    resumed.reset(committed)
    assert [e["id"] for e in read_applied_log(tmp_path)] == ["a:0"]
    resumed.append([{"id": "a:1", "outcome": "duplicate", "reason": "duplicate", "version": 2}])
    assert [(e["id"], e["outcome"]) for e in read_applied_log(tmp_path)] == [
        ("a:0", "applied"), ("a:1", "duplicate")]


def test_a_checkpoint_write_killed_half_way_leaves_the_old_one(tmp_path: Path) -> None:
    old = Checkpoint(tensors={"w": torch.zeros(64)}, state={"version": 1})
    save_checkpoint(tmp_path, old)

    def die() -> None:
        raise Crashed

    with pytest.raises(Crashed):
        save_checkpoint(tmp_path, Checkpoint(tensors={"w": torch.ones(64)}, state={"version": 2}),
                        on_partial=die)
    assert list(tmp_path.glob(".*.tmp")), "the half-written temp file is what a crash leaves"
    restored = load_checkpoint(tmp_path)
    assert restored is not None and restored.version == 1
    assert torch.equal(restored.tensors["w"], torch.zeros(64))
    save_checkpoint(tmp_path, Checkpoint(tensors={"w": torch.ones(64)}, state={"version": 3}))
    assert not list(tmp_path.glob(".*.tmp")), "the next checkpoint removes the crashed one's temp file"
