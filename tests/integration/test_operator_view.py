"""What an operator sees of a real coordinator (in a thread) on the real servers: ``/metrics``
scraped over HTTP agrees with ``status``; ``status --watch`` follows it; a Redis URL whose database
does not exist ends in one line."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

import coordinator.cli as cli
from coordinator.config import MetricsConfig
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.snapshot import SnapshotStore
from tests.services import MADE_UP_DELTAS_GUARD, publish_to_queue, serving, small_config

pytestmark = pytest.mark.integration

BAD_DB_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/99"  # a database index the server does not have


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    # One eval (at the start): a later one between the status and the scrape would tell them apart.
    config = small_config(run_name, tmp_path, metrics=MetricsConfig(port=_free_port()), eval_interval_s=3600,
                          guard=MADE_UP_DELTAS_GUARD)  # on: its deltas share a direction
    with serving(config) as coord:
        yield coord


def _delta(coord: Coordinator, *, client_id: str, seq: int, local_steps: int) -> bytes:
    """A small, well-formed delta on the newest snapshot: one direction all deltas share, as honest
    ones do (the guard refuses one against the momentum), plus noise of its own."""
    snap = SnapshotStore(redis.Redis.from_url(REDIS_URL), coord.keys).read_latest()
    codec = get_codec("fp16")
    shared = torch.Generator().manual_seed(7)
    gen = torch.Generator().manual_seed(seq + 100 * len(client_id))
    return DeltaMessage(
        run_id=snap.manifest.run_id, client_id=client_id, seq=seq, base_version=snap.version,
        local_steps=local_steps, samples=4 * local_steps, tokens=516 * local_steps, compute_s=1.0,
        train_loss=3.0, codec="fp16",
        tensors={e.name: codec.encode(1e-3 * (torch.randn(e.numel, generator=shared)
                                              + 0.5 * torch.randn(e.numel, generator=gen)))
                 for e in snap.manifest.params},
    ).encode()


def _status(run: str) -> dict[str, Any]:
    raw = redis.Redis.from_url(REDIS_URL).get(RunKeys(run).status)
    return json.loads(raw) if raw else {}


def _scrape(coord: Coordinator) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` over HTTP, parsed: sample name → labels → value."""
    assert coord.metrics.address is not None
    host, port = coord.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_scraped_over_http_match_the_status(coordinator: Coordinator, run_name: str) -> None:
    publish_to_queue(run_name, [_delta(coordinator, client_id="alice", seq=0, local_steps=10),
                        _delta(coordinator, client_id="bob", seq=0, local_steps=20)])
    wait_for(lambda: _status(run_name).get("deltas", {}).get("applied") == 2, what="2 applied deltas")
    again = _delta(coordinator, client_id="alice", seq=1, local_steps=10)
    publish_to_queue(run_name, [again, again, b"\x00 not a delta"])  # applied, duplicate, rejected
    # A status written after the last commit, once the broker's counts caught up: nothing changes
    # after it, so the scrape must show the same numbers.
    status = wait_for(
        lambda: (s := _status(run_name)).get("deltas", {}).get("applied") == 3
        and s["deltas"]["duplicate"] == 1 and s["deltas"]["rejected"] == 1
        and not coordinator.batch and s["commits"] == coordinator.run.commits
        and s["queue"]["depth"] == 0 and s["queue"]["dead_letters"] == 1 and s,
        what="every delta committed and settled in status",
    )
    m = _scrape(coordinator)
    assert m["asyncloco_version"][()] == status["version"] > 0
    assert m["asyncloco_commits_total"][()] == status["commits"]
    for outcome in ("applied", "duplicate", "rejected"):
        assert m["asyncloco_deltas_total"][(("outcome", outcome),)] == status["deltas"][outcome], outcome
    assert {dict(k)["reason"]: v for k, v in m["asyncloco_deltas_rejected_total"].items()} == \
        status["deltas"]["rejected_by_reason"] == {"undecodable": 1}
    assert m["asyncloco_local_steps_total"][()] == status["progress"]["local_steps"]
    assert m["asyncloco_tokens_total"][()] == status["progress"]["tokens"]
    assert m["asyncloco_delta_queue_depth"][()] == status["queue"]["depth"] == 0
    assert m["asyncloco_dead_letter_queue_depth"][()] == status["queue"]["dead_letters"]
    assert m["asyncloco_eval_loss"][()] == pytest.approx(status["eval"]["latest"], abs=1e-6)
    for client in status["clients"]:
        label = (("client", client["client_id"]),)
        assert m["asyncloco_volunteer_deltas_applied_total"][label] == client["updates"]
        assert m["asyncloco_volunteer_local_steps_total"][label] == client["local_steps"]
        assert m["asyncloco_volunteer_tokens_total"][label] == client["tokens"]
    assert {dict(k)["client"] for k in m["asyncloco_volunteer_deltas_applied_total"]} == {"alice", "bob"}
    # the histograms count what happened in this process: every applied delta, commit, publish
    assert m["asyncloco_delta_staleness_updates_count"][()] == 3
    assert m["asyncloco_delta_apply_seconds_count"][()] == 3
    assert m["asyncloco_commit_seconds_count"][()] == status["commits"]
    assert m["asyncloco_snapshot_publish_seconds_count"][()] >= 2
    assert m["asyncloco_snapshot_published_version"][()] == status["version"]


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli.main, args, prog_name="asyncloco-coordinator")


def test_status_watch_follows_a_serving_coordinator(coordinator: Coordinator, run_name: str) -> None:
    wait_for(lambda: _status(run_name).get("coordinator", {}).get("state") == "serving", what="status")
    result = invoke(["status", "--run", run_name, "--redis", REDIS_URL, "--amqp", AMQP_URL,
                     "--watch", "0.2", "--count", "2", "--json"])
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 2 and all(d["run"] == run_name and d["queue"]["depth"] == 0 for d in docs)
    text = invoke(["status", "--run", run_name, "--redis", REDIS_URL, "--amqp", AMQP_URL,
                   "--watch", "0.1", "--count", "2"])
    assert text.exit_code == 0, text.output
    assert text.stdout.count(f"run {run_name} (") == 2


def assert_bad_database_line(result: Result) -> None:
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: Redis at {BAD_DB_REDIS} refused: DB index is out of range"), line
    assert "/N at the end of the URL" in line
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["status"], ["delete-run", "probe-run", "--yes"]])
def test_a_redis_database_index_out_of_range_is_one_line(command: list[str]) -> None:
    assert_bad_database_line(invoke([*command, "--redis", BAD_DB_REDIS]))


def test_serve_on_a_redis_database_index_out_of_range_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_install_signals", lambda stop: None)
    result = invoke(["serve", "--run", "probe-db", "--auth", "open", "--checkpoint-dir", str(tmp_path),
                     "--redis", BAD_DB_REDIS, "--amqp", AMQP_URL, "--max-seconds", "1"])
    assert_bad_database_line(result)
