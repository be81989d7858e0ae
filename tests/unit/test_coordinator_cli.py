"""The coordinator's command line without servers: bad arguments end as one line, ``--fresh`` sets
the old run aside, ``serve`` and ``simulate`` share their options, ``delete-run`` asks first."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result

import coordinator.cli as cli
from coordinator.applied_log import FILENAME as APPLIED_LOG
from coordinator.checkpoint import FILENAME as CHECKPOINT
from coordinator.checkpoint import set_aside
from coordinator.lease import CoordinatorLease
from coordinator.sim.cli import simulate
from shared.errors import ConfigError, RunTaken
from shared.settings import ConnectionSettings
from tests.services import FakeCoordinator

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # port 1: connection refused at once, no server needed

# Declared once in coordinator/options.py, applied to both commands.
SHARED = ["outer_lr", "outer_momentum", "staleness_exponent", "buffer_size", "local_steps",
          "min_local_steps", "warm_start_steps", "model_size", "data", "seed", "threads"]
# serve leaves these unset (the task or --task-setting decides; torch picks its threads).
DIFFERENT_DEFAULTS = {"model_size": (None, "tiny"), "data": (None, "stdlib"), "threads": (None, 1)}


def invoke(args: list[str], **kwargs: Any) -> Result:
    return CliRunner().invoke(cli.main, args, prog_name="asyncloco-coordinator", **kwargs)


def assert_one_line_error(result: Result, exit_code: int, fragment: str) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no crash


def params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name is not None}


# --- set_aside -----------------------------------------------------------------------------------


def test_set_aside_renames_the_checkpoint_and_applied_log(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"old model")
    (tmp_path / APPLIED_LOG).write_text('{"id": "a:1"}\n')
    aside = set_aside(tmp_path, now=1700000000.7)
    assert aside == tmp_path / "checkpoint.1700000000.old"
    assert aside.read_bytes() == b"old model"
    assert (tmp_path / "applied.1700000000.jsonl.old").read_text() == '{"id": "a:1"}\n'
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / APPLIED_LOG).exists()


def test_set_aside_never_overwrites_an_earlier_set_aside(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"first")
    first = set_aside(tmp_path, now=50)
    (tmp_path / CHECKPOINT).write_bytes(b"second")
    second = set_aside(tmp_path, now=50)  # the same second
    assert first is not None and second is not None and first != second
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")


def test_set_aside_without_a_checkpoint(tmp_path: Path) -> None:
    assert set_aside(tmp_path / "missing") is None
    (tmp_path / APPLIED_LOG).write_text("orphan\n")  # an old run that never checkpointed
    assert set_aside(tmp_path, now=7) is None
    assert (tmp_path / "applied.7.jsonl.old").read_text() == "orphan\n"


# --- help and shared options --------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["simulate"], ["status"], ["delete-run"], ["sample"]])
def test_help(command: list[str]) -> None:
    result = invoke([*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: asyncloco-coordinator" in result.output


def test_serve_and_simulate_share_their_common_options() -> None:
    serve, sim = params(cli.serve), params(simulate)
    for name in SHARED:
        assert name in serve and name in sim, name
        a, b = serve[name], sim[name]
        assert isinstance(a, click.Option) and isinstance(b, click.Option)
        assert (a.opts, a.envvar, a.type.to_info_dict()) == (b.opts, b.envvar, b.type.to_info_dict()), name
        if name in DIFFERENT_DEFAULTS:
            assert (a.default, b.default) == DIFFERENT_DEFAULTS[name], name
        else:
            assert (a.default, a.help) == (b.default, b.help), name
    assert serve["outer_lr"].default == 0.5 and serve["local_steps"].default == 30
    assert serve["min_local_steps"].default == 5 and serve["outer_momentum"].default == 0.8
    assert serve["strategy"].default == "edn" and serve["compute_exponent"].default == 1.0
    assert serve["grace_rounds"].default == 0.25


@pytest.mark.parametrize("command", ["serve", "simulate"])
def test_a_shared_option_reads_its_environment_variable_in_both_commands(
    command: str, tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    result = invoke([command, "--checkpoint-dir" if command == "serve" else "--out", str(tmp_path)],
                    env={"ASYNCLOCO_OUTER_LR": "fast"})
    assert_one_line_error(result, 2, "--outer-lr")
    assert fake_service == []


# --- serve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exit_code", "fragment"),
    [
        (["--outer-lr", "fast"], 2, "--outer-lr"),
        (["--local-steps", "0"], 2, "--local-steps"),
        (["--model-size", "huge"], 2, "--model-size"),
        (["--no-such-option"], 2, "--no-such-option"),
        (["--crash-at", "nowhere"], 1, "--crash-at: unknown point"),
        (["--crash-at", "after_apply:0"], 1, "--crash-at"),
        (["--run", "bad name!"], 1, "invalid run name"),
        (["--redis", "http://localhost"], 1, "--redis must be a redis:// URL"),
        (["--task-setting", "novalue"], 1, "--task-setting takes KEY=VALUE"),
        (["--fresh", "--resume"], 1, "--fresh and --resume exclude each other"),
        (["--fresh", "--crash-at", "nowhere"], 1, "--crash-at: unknown point"),
        (["--fresh", "--prefetch", "8", "--commit-every", "16"], 1, "prefetch (8) must exceed"),
        (["--delta-queues", "0"], 2, "--delta-queues"),
        (["--delta-queues", "17"], 2, "--delta-queues"),
        (["--snapshot-patches", "fp32"], 2, "--snapshot-patches"),
        (["--redis", "redis+clusters://h:7000"], 1, "--redis must be a redis:// URL"),
    ],
)
def test_serve_refuses_bad_arguments_in_one_line(
    args: list[str], exit_code: int, fragment: str, tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"kept")
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path), *args])
    assert_one_line_error(result, exit_code, fragment)
    assert fake_service == []  # refused before a coordinator was built
    assert (tmp_path / CHECKPOINT).read_bytes() == b"kept"  # and before anything was set aside


def test_serve_fresh_sets_the_old_run_aside_and_builds_the_coordinator(
    tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"old")
    (tmp_path / APPLIED_LOG).write_text("old\n")
    result = invoke(["serve", "--fresh", "--checkpoint-dir", str(tmp_path), "--run", "r1",
                     "--crash-at", "after_ack:2", "--redis", "redis://127.0.0.1:6390/2"])
    assert result.exit_code == 0, result.output
    assert "previous checkpoint set aside as" in result.stderr
    assert "coordinator stopped at version 3" in result.stdout
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / APPLIED_LOG).exists()
    assert len(list(tmp_path.glob("checkpoint.*.old"))) == 1
    assert len(list(tmp_path.glob("applied.*.jsonl.old"))) == 1
    (built,) = fake_service
    assert built.config.run == "r1" and built.config.checkpoint_dir == tmp_path
    assert isinstance(built.redis, redis.Redis)
    assert built.redis.connection_pool.connection_kwargs["port"] == 6390
    assert built.crash.target == ("after_ack", 2)


def test_serve_takes_the_new_options_into_its_config(
    tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    result = invoke(["serve", "--fresh", "--checkpoint-dir", str(tmp_path), "--delta-queues", "3",
                     "--snapshot-patches", "none", "--redis", "redis+cluster://127.0.0.1:7000/0"])
    assert result.exit_code == 0, result.output
    (built,) = fake_service
    assert built.config.queue.count == 3 and built.config.commit.patch_codec_or_none is None
    assert built.config.connection.redis_url == "redis+cluster://127.0.0.1:7000/0"


def test_serve_reports_an_unreachable_redis_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_service: list[FakeCoordinator]
) -> None:
    def refuse(self: FakeCoordinator) -> None:
        self.redis.ping()  # past the real one's first contact, a Redis away is an outage: exit 1

    monkeypatch.setattr(FakeCoordinator, "serve", refuse)
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path), "--redis", UNREACHABLE_REDIS])
    assert_one_line_error(result, 1, "cannot reach Redis at redis://127.0.0.1:1/0")


class LeasedRedis:
    """Just enough of a Redis client for CoordinatorLease: another live coordinator holds the key."""

    def __init__(self, holder: bytes) -> None:
        self.holder = holder

    def register_script(self, script: str) -> Any:
        return lambda keys, args: 0  # a refresh never finds the lease ours

    def set(self, key: str, value: str, **kwargs: Any) -> bool | None:
        return None  # SET NX: taken

    def get(self, key: str) -> bytes:
        return self.holder


def test_a_run_another_coordinator_serves_ends_serve_with_its_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_service: list[FakeCoordinator]
) -> None:
    def serve(self: FakeCoordinator) -> None:
        # A holder on another machine is never known dead: its lease runs out with the TTL.
        CoordinatorLease(LeasedRedis(b"elsewhere.example:4242:cafe0123"), "k").acquire(wait_s=0)

    monkeypatch.setattr(FakeCoordinator, "serve", serve)
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path)])
    assert_one_line_error(result, RunTaken.exit_code,
                          "another coordinator (elsewhere.example:4242:cafe0123) is serving this run")


def test_serve_signs_with_the_key_that_the_key_command_prints(
    tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    printed = invoke(["key", "--checkpoint-dir", str(tmp_path)])  # before the first start: creates it
    assert printed.exit_code == 0, printed.output
    public_hex = printed.stdout.strip()
    assert len(public_hex) == 64 and int(public_hex, 16) >= 0
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    result = invoke(["serve", "--checkpoint-dir", str(tmp_path), "--run", "r1"])
    assert result.exit_code == 0, result.output
    (built,) = fake_service
    assert built.signing_key.public_hex == public_hex  # the same file, not a new key
    again = invoke(["key", "--signing-key", str(tmp_path / "signing.key")])
    assert again.stdout.strip() == public_hex


def test_serve_refuses_a_signing_key_others_can_read_before_anything_changes(
    tmp_path: Path, fake_service: list[FakeCoordinator]
) -> None:
    key_file = tmp_path / "elsewhere.key"
    assert invoke(["key", "--signing-key", str(key_file)]).exit_code == 0
    key_file.chmod(0o644)
    (tmp_path / CHECKPOINT).write_bytes(b"kept")
    result = invoke(["serve", "--fresh", "--checkpoint-dir", str(tmp_path), "--signing-key", str(key_file)],
                    env={})
    assert_one_line_error(result, 1, "readable by group or others (mode 0644)")
    assert fake_service == [] and (tmp_path / CHECKPOINT).read_bytes() == b"kept"  # nothing set aside
    assert_one_line_error(invoke(["key", "--signing-key", str(key_file)]), 1, "chmod 600")


# --- simulate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exit_code", "fragment"),
    [
        (["--workers", "0"], 2, "--workers"),
        (["--heterogeneity", "wild"], 2, "--heterogeneity"),
        (["--codec", "fp8"], 2, "--codec"),
        (["--speeds", "1,fast"], 1, "--speeds takes numbers"),
        (["--speeds", "1,0"], 1, "speeds must be positive"),
        (["--strategies", "dn,adam"], 1, "unknown strategy 'adam'"),
        (["--strategies", " , "], 1, "--strategies names no strategy"),
        (["--local-steps", "2", "--min-local-steps", "3"], 1, "min_local_steps"),
    ],
)
def test_simulate_refuses_bad_arguments_in_one_line(
    args: list[str], exit_code: int, fragment: str, tmp_path: Path
) -> None:
    import torch

    threads = torch.get_num_threads()
    result = invoke(["simulate", "--out", str(tmp_path), *args])
    assert_one_line_error(result, exit_code, fragment)
    assert torch.get_num_threads() == threads  # refused before it touched the process
    assert not list(tmp_path.iterdir())


# --- delete-run ----------------------------------------------------------------------------------


@dataclass
class Deletion:
    keys_deleted: int
    queues_deleted: list[str]


@pytest.fixture
def run_admin(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """A stand-in for coordinator.run_admin that records its calls; Redis answers every ping."""
    calls: list[tuple[str, str, bool]] = []

    def delete_run(client: redis.Redis, servers: ConnectionSettings, run: str, *, force: bool) -> Deletion:
        calls.append((servers.amqp_url, run, force))
        if run == "leased" and not force:
            raise ConfigError("run leased is served by coordinator abc; stop it or pass --force")
        return Deletion(keys_deleted=12, queues_deleted=[f"asyncloco.{run}.deltas"])

    module = types.ModuleType("coordinator.run_admin")
    module.delete_run = delete_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "coordinator.run_admin", module)
    monkeypatch.setattr(redis.Redis, "ping", lambda self, **kwargs: True)
    return calls


@pytest.mark.parametrize(
    ("args", "exit_code", "fragment"),
    [
        ([], 2, "Missing argument 'RUN'"),
        (["bad name!"], 1, "invalid run name"),
        (["../etc"], 1, "invalid run name"),
        (["r1", "--redis", "http://x"], 1, "--redis must be a redis:// URL"),
        (["r1", "--yes", "--redis", UNREACHABLE_REDIS], 1, "cannot reach Redis at redis://127.0.0.1:1/0"),
    ],
)
def test_delete_run_refuses_bad_arguments_in_one_line(args: list[str], exit_code: int, fragment: str) -> None:
    assert_one_line_error(invoke(["delete-run", *args]), exit_code, fragment)


def test_delete_run_asks_first_and_deletes_nothing_when_declined(
    run_admin: list[tuple[str, str, bool]],
) -> None:
    result = invoke(["delete-run", "r1"], input="n\n")
    assert "Delete every Redis key and queue of run r1? [y/N]" in result.output
    assert_one_line_error(result, 1, "nothing deleted")
    assert run_admin == []


def test_delete_run_deletes_when_confirmed(run_admin: list[tuple[str, str, bool]]) -> None:
    result = invoke(["delete-run", "r1", "--amqp", "amqp://u:p@h:5672/%2F"], input="y\n")
    assert result.exit_code == 0, result.output
    assert run_admin == [("amqp://u:p@h:5672/%2F", "r1", False)]
    last = result.stdout.strip().splitlines()[-1]
    assert last == "deleted run r1: 12 Redis keys; queues: asyncloco.r1.deltas"


def test_delete_run_with_yes_does_not_ask(run_admin: list[tuple[str, str, bool]]) -> None:
    result = invoke(["delete-run", "r1", "--yes"])
    assert result.exit_code == 0, result.output
    assert "[y/N]" not in result.output and len(run_admin) == 1


def test_delete_run_of_a_served_run_needs_force(run_admin: list[tuple[str, str, bool]]) -> None:
    assert_one_line_error(invoke(["delete-run", "leased", "--yes"]), 1, "pass --force")
    result = invoke(["delete-run", "leased", "--yes", "--force"])
    assert result.exit_code == 0, result.output
    assert run_admin[-1][1:] == ("leased", True)
