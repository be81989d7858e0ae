"""The volunteer's command line against the real servers: ``--max-hours`` ends ``join`` cleanly
(exit 0, one line saying why) after the round in hand, off a terminal the output is the plain
lines, and ``stats`` then counts exactly the rounds it ran and the deltas it sent.

The test plays the coordinator's part (snapshot v0 and a round plan in Redis, the delta queue),
as tests/integration/test_client_upload.py does; nobody judges the deltas, so none has a verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pika
import pytest
import redis
from click.testing import CliRunner

from client import cli
from harness.processes import AMQP_URL, REDIS_URL, ROOT
from shared.keys import RunKeys
from tests.integration.test_client_upload import (
    SIGNING_KEY,
    declare_delta_queue,
    publish_run,
    take_messages,
)

pytestmark = pytest.mark.integration


def client(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """``asyncloco-client ARGS`` run to its end as a real process, with no ASYNCLOCO_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCLOCO_")}
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s, env=dict(env, PYTHONUNBUFFERED="1"))


def test_max_hours_stops_the_client_in_one_line_and_stats_counts_its_rounds(
    tmp_path: Path, run_name: str, redis_client: redis.Redis
) -> None:
    keys = RunKeys(run_name)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        declare_delta_queue(channel, keys)
        manifest = publish_run(redis_client, keys, local_steps=8)
        state = str(tmp_path / "state")
        done = client("join", "--run", run_name, "--client-id", "polite", "--threads", "1", "--device", "cpu",
                      "--state-dir", state, "--coordinator-key", SIGNING_KEY.public_hex, "--redis", REDIS_URL,
                      "--amqp", AMQP_URL, "--include-wait", "0", "--max-hours", str(1.5 / 3600))
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.strip().splitlines()
        rounds = [line for line in lines if line.startswith("round ")]
        assert len(rounds) >= 2  # ~1.5 s of training in rounds of 8 steps
        assert lines[-1] == (f"stopped (max_hours): {len(rounds)} rounds, {len(rounds)} deltas sent as "
                             f"client polite, next seq {len(rounds)}")
        assert "\x1b[" not in done.stdout  # off a terminal: no live panel, no escape codes
        assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr
        take_messages(channel, keys.delta_queue, len(rounds))
    finally:
        connection.close()

    shown = CliRunner().invoke(cli.main, ["stats", "--state-dir", state, "--json"])  # in-process: quicker
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    total = doc["total"]
    assert total["rounds"] == total["deltas_sent"] == total["unjudged"] == len(rounds)
    assert total["bytes_down"] == manifest.total_bytes  # the snapshot, downloaded once
    assert total["local_steps"] == sum(int(line.split("H=")[1].split()[0]) for line in rounds)
    assert 1.5 <= total["compute_s"] < 1.5 + 30  # the limit, and the round in hand at most
    assert doc["runs"][manifest.run_id]["run"] == run_name
    text = CliRunner().invoke(cli.main, ["stats", "--state-dir", state])
    assert text.exit_code == 0 and f"run {run_name!r} (id {manifest.run_id})" in text.stdout
