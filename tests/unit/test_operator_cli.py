"""The operator's commands without servers: ``serve``'s error probes end in one line, ``--resume``
says what differs from the checkpoint, ``status --watch`` repeats until told to stop, ``export``
writes a model that loads, ``--metrics-port`` reaches the coordinator's config."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file, save

import coordinator.cli as cli
import coordinator.run_cli as run_cli
from coordinator.checkpoint import FILENAME as CHECKPOINT
from coordinator.checkpoint import save_checkpoint
from coordinator.export import CONFIG_FILE, MODEL_FILE
from coordinator.outer_optimizer import OuterConfig
from coordinator.run_state import RunState, resume_differences
from shared.errors import CheckpointUnusable
from shared.local_round import InnerConfig
from shared.tasks import load_task
from tests.services import FakeCoordinator, small_config
from tests.unit.test_coordinator_cli import assert_one_line_error, invoke

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # port 1: refused at once; the probes fail before Redis


@pytest.fixture
def no_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real coordinator, but pytest's own signal handlers kept."""
    monkeypatch.setattr(cli, "_install_signals", lambda stop: None)


def _serve(checkpoint_dir: Path, *args: str) -> Result:
    return invoke(["serve", "--run", "probe", "--auth", "open", "--checkpoint-dir", str(checkpoint_dir),
                   "--redis", UNREACHABLE_REDIS, "--max-seconds", "1", *args])


# --- serve: the error probes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "resume"),
    [
        (os.urandom(200), True),  # noise
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ", True),  # a header that is not JSON
        (save({"w": torch.zeros(2)}), True),  # a safetensors file, but not a checkpoint
        (save({"w": torch.zeros(2)}, metadata={"asyncloco": "[1, 2]"}), False),  # and without --resume
    ],
    ids=["noise", "bad-header", "foreign-safetensors", "bad-state-no-resume"],
)
def test_serve_refuses_a_corrupt_checkpoint_in_one_line(
    content: bytes, resume: bool, tmp_path: Path, no_signals: None
) -> None:
    (tmp_path / CHECKPOINT).write_bytes(content)
    result = _serve(tmp_path, *(["--resume"] if resume else []))
    assert_one_line_error(result, CheckpointUnusable.exit_code,
                          f"checkpoint {tmp_path / CHECKPOINT} is unreadable")
    assert "--fresh" in result.stderr
    assert (tmp_path / CHECKPOINT).read_bytes() == content  # left for the operator to judge


def test_serve_resume_without_a_checkpoint_refuses_rather_than_starting_afresh(
    tmp_path: Path, no_signals: None
) -> None:
    result = _serve(tmp_path / "empty", "--resume")
    assert_one_line_error(result, 65, "--resume: no checkpoint of run 'probe'")
    assert not (tmp_path / "empty" / CHECKPOINT).exists()


def test_serve_refuses_a_checkpoint_dir_through_a_file(tmp_path: Path, no_signals: None) -> None:
    (tmp_path / "file").write_text("x")
    assert_one_line_error(_serve(tmp_path / "file" / "ckpt"), 65, "cannot create it or write in it")
    # the file itself: click's own check, one line too
    assert_one_line_error(_serve(tmp_path / "file"), 2, "is a file")


def test_serve_refuses_a_checkpoint_dir_that_cannot_be_created(no_signals: None) -> None:
    # /proc takes no new directories, not even from root
    assert_one_line_error(_serve(Path("/proc/asyncloco-probe")), 65, "cannot create it or write in it")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_serve_refuses_an_unwritable_checkpoint_dir(tmp_path: Path, no_signals: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_one_line_error(_serve(locked), 65, "cannot create it or write in it")
    finally:
        locked.chmod(0o700)


# --- --resume: what differs from the checkpoint --------------------------------------------------


def test_resume_differences_name_each_option_old_to_new(tmp_path: Path) -> None:
    first = small_config("r", tmp_path)
    saved = {
        "run_config": {"task": "bytelm", "seed": 0, "inner": dataclasses.asdict(first.inner),
                       "task_settings": {**first.task_settings, "seq_len": 64}},
        "outer_config": dataclasses.asdict(first.outer),
    }
    assert resume_differences(saved, first) == []
    changed = dataclasses.replace(
        first, seed=3, inner=InnerConfig(lr=1e-3), outer=OuterConfig(lr=0.7, momentum=0.9),
        task_settings={**first.task_settings, "model_size": "small"},
    )
    assert resume_differences(saved, changed) == [
        "seed 0 → 3 (kept)",
        "task_settings.model_size 'tiny' → 'small' (kept)",
        "inner.lr 0.003 → 0.001 (kept)",
        "outer.lr 0.5 → 0.7 (applies)",
        "outer.momentum 0.8 → 0.9 (applies)",
    ]
    del saved["outer_config"]  # a checkpoint from before outer options were saved
    assert all("outer." not in d for d in resume_differences(saved, changed))


def test_resume_warns_once_with_the_differences_and_keeps_the_checkpoints_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = small_config("r", tmp_path)
    checkpoint = RunState.open(first, None, None).checkpoint()
    changed = dataclasses.replace(first, resume=True, inner=InnerConfig(lr=1e-3), outer=OuterConfig(lr=0.7))
    with caplog.at_level(logging.WARNING, logger="coordinator.run_state"):
        resumed = RunState.open(changed, checkpoint, None)
    (record,) = [r for r in caplog.records if r.name == "coordinator.run_state"]
    message = record.getMessage()
    assert "\n" not in message
    assert "inner.lr 0.003 → 0.001 (kept)" in message and "outer.lr 0.5 → 0.7 (applies)" in message
    assert resumed.run_config["inner"]["lr"] == 0.003  # clients keep building the checkpoint's run
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coordinator.run_state"):
        RunState.open(dataclasses.replace(first, resume=True), checkpoint, None)
    assert not [r for r in caplog.records if r.name == "coordinator.run_state"]  # same options: quiet


# --- status --watch ------------------------------------------------------------------------------


@pytest.fixture
def status_docs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``status`` reads a made-up document whose version rises by one per read; no servers."""
    reads: list[int] = []

    def read(servers: Any, keys: Any) -> dict[str, Any]:
        reads.append(len(reads))
        return {"run": keys.run, "version": len(reads)}

    monkeypatch.setattr(run_cli, "_status_doc", read)
    monkeypatch.setattr(run_cli, "render_text", lambda doc: f"run {doc['run']} version {doc['version']}")
    monkeypatch.setattr(run_cli.time, "sleep", lambda s: None)
    return reads


def test_status_watch_prints_again_until_its_count(status_docs: list[int]) -> None:
    result = invoke(["status", "--run", "w", "--watch", "0.5", "--count", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n\n") == ["run w version 1", "run w version 2", "run w version 3\n"]


def test_status_watch_json_prints_one_document_a_line(status_docs: list[int]) -> None:
    result = invoke(["status", "--run", "w", "--watch", "--json", "--count", "2"])  # --watch: default
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["version"] for line in result.stdout.splitlines()] == [1, 2]


def test_status_watch_ends_quietly_on_ctrl_c(status_docs: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli.time, "sleep", interrupt)
    result = invoke(["status", "--run", "w", "--watch", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "run w version 1\n" and result.stderr == ""


@pytest.mark.parametrize(("args", "exit_code", "fragment"), [
    (["--watch", "0"], 2, "--watch"),
    (["--watch", "soon"], 2, "--watch"),
    (["--count", "-1"], 2, "--count"),
])
def test_status_watch_refuses_bad_arguments_in_one_line(
    args: list[str], exit_code: int, fragment: str
) -> None:
    assert_one_line_error(invoke(["status", *args]), exit_code, fragment)


def test_status_watch_on_an_unreachable_redis_is_one_line() -> None:
    result = invoke(["status", "--watch", "0.1", "--count", "2", "--redis", UNREACHABLE_REDIS])
    assert_one_line_error(result, 1, "cannot reach Redis at redis://127.0.0.1:1/0")


# --- export --------------------------------------------------------------------------------------


def test_export_writes_a_model_that_loads_into_the_tasks_model(tmp_path: Path) -> None:
    config = small_config("exp", tmp_path)
    run = RunState.open(config, None, None)
    with torch.no_grad():
        for param in run.optimizer.params.values():
            param.add_(0.5)  # not the initial model: the export must be θ, not a rebuild
    run.version = 7
    run.evaluate()
    save_checkpoint(tmp_path / "ckpt", run.checkpoint())
    result = invoke(["export", "exp", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "exported run exp version 7" in result.stdout
    exported = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert exported["version"] == 7 and exported["run_id"] == run.run_id
    assert exported["eval"]["version"] == 7
    model = load_task(exported["task"], exported["task_settings"]).build_model()
    model.load_state_dict(load_file(tmp_path / "out" / MODEL_FILE), strict=True)
    for name, param in model.named_parameters():
        assert torch.equal(param, run.optimizer.params[name]), name


def test_export_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = invoke(["export", "exp", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "none")])
    assert_one_line_error(result, 1, "nothing to export")
    assert not (tmp_path / "out").exists()


# --- --metrics-port ------------------------------------------------------------------------------


def test_serve_hands_the_metrics_options_to_the_coordinator(
    tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    assert invoke(["serve", "--checkpoint-dir", str(tmp_path)]).exit_code == 0
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path), "--metrics-port", "9109",
                     "--metrics-host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert [(c.config.metrics.port, c.config.metrics.host) for c in fake_service] == [
        (0, "127.0.0.1"), (9109, "0.0.0.0")]
    assert_one_line_error(invoke(["serve", "--checkpoint-dir", str(tmp_path), "--metrics-port", "70000"]),
                          2, "--metrics-port")


@pytest.mark.parametrize(("command", "shown"), [
    (["export"], "RUN DIRECTORY"), (["status"], "--watch [SECONDS]"), (["serve"], "--metrics-port"),
])
def test_help_shows_the_operator_options(command: list[str], shown: str) -> None:
    result = invoke([*command, "--help"])
    assert result.exit_code == 0, result.output
    assert shown in result.output
