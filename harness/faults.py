"""What the fault tests and the soak do to a run and ask of it.

The command lines of a small, fast coordinator and client (the tiny model: a client round takes
~1 s on one CPU thread), and probes of one run on the test servers: its status document, a full
check of its current snapshot, the depth of its delta queue, and closing the coordinator's broker
connection from the broker's side.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pika
import redis

from harness.processes import AMQP_URL, REDIS_URL
from shared.keys import RunKeys
from shared.signing import KEY_FILE_NAME, SigningKey
from shared.snapshot import SnapshotStore

# The tiny model on a small corpus: a client round takes ~1 s on one CPU thread.
TASK = ["--model-size", "tiny", "--batch-size", "8", "--task-setting", "max_corpus_bytes=2000000",
        "--task-setting", "eval_sequences=16"]


def run_key(workdir: Path) -> tuple[Path, str]:
    """The signing key of a test's run, created once in ``workdir``: its path (the coordinator's
    ``--signing-key``) and its public half in hex (the clients' ``--coordinator-key``)."""
    path = Path(workdir) / KEY_FILE_NAME
    return path, SigningKey.load_or_create(path).public_hex


def coordinator_args(run: str, checkpoint_dir: Path, *extra: str) -> list[str]:
    """``python`` arguments of a coordinator serving ``run`` with the tiny task, one thread.

    It signs with ``run_key(checkpoint_dir.parent)``: beside the checkpoint directory, not in it,
    so a test that sets the checkpoint aside keeps the key its clients pinned.
    """
    key_path, _ = run_key(checkpoint_dir.parent)
    extra = ("--signing-key", str(key_path), *extra)
    # --auth open: these clients are the test's own, under ids it picks (invites: tests/integration)
    return ["-m", "coordinator.cli", "serve", "--run", run, *TASK, "--threads", "1", "--auth", "open",
            "--checkpoint-dir", str(checkpoint_dir), "--local-steps", "6", "--min-local-steps", "2",
            # rounds of ~1 s (the default, 30 a minute, is for real rounds): honest, not rate_limited
            "--max-deltas-per-minute", "600",
            "--eval-interval", "5", *extra]


def client_args(run: str, client_id: str, state_dir: Path, journal: Path, max_seconds: float, *,
                coordinator_key: str) -> list[str]:
    """``python`` arguments of a CPU client of ``run`` that journals its confirmed deltas and
    trusts snapshots signed by ``coordinator_key`` (hex: ``run_key(...)[1]``)."""
    # fp16: the fault tests' byte arithmetic (queue bounds, part counts) is of fp16 deltas
    return ["-m", "client.cli", "join", "--run", run, "--client-id", client_id, "--threads", "1",
            "--codec", "fp16", "--device", "cpu", "--state-dir", str(state_dir),
            "--max-seconds", str(max_seconds),
            "--journal", str(journal), "--log-level", "info", "--coordinator-key", coordinator_key]


def status(run: str) -> dict[str, Any]:
    """The run's status document in Redis, or ``{}`` before a coordinator wrote one."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw = client.get(RunKeys(run).status)
    finally:
        client.close()
    return json.loads(raw) if raw else {}


def verify_snapshot(run: str) -> int:
    """Read and sha256-check the current snapshot in Redis; return its version."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return SnapshotStore(client, RunKeys(run)).read().version
    finally:
        client.close()


def queue_depth(run: str, *, dead_letters: bool = False) -> int:
    """Ready messages in the run's delta queue (unacked ones return to it once consumers close),
    or in its dead-letter queue."""
    keys = RunKeys(run)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        name = keys.dead_letter_queue if dead_letters else keys.delta_queue
        return int(connection.channel().queue_declare(name, passive=True).method.message_count)
    finally:
        connection.close()


def close_coordinator_connection(run: str) -> str:
    """Have the broker close the coordinator's AMQP connection of ``run`` (and no other).

    The connection is found by its client-given name; ``rabbitmqctl close_connection`` takes the
    connection's Erlang pid (e.g. ``<rabbit@host.1.2345.0>``), which the listing gives next to it.
    """
    wanted = f'{{"connection_name","asyncloco-coordinator:{run}"}}'
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if wanted in line]
    if len(pids) != 1:
        raise AssertionError(f"expected one connection named asyncloco-coordinator:{run}: {listing}")
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pids[0], "fault test"],
                   capture_output=True, text=True, timeout=60, check=True)
    return pids[0]
