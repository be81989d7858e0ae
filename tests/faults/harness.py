"""Shared machinery of the fault tests: real processes, the two journals, and the oracle.

The oracle is Jepsen's idea at the scale of one run. Each side writes down what it knows:

* a client appends ``client_id:seq`` to its journal (fsynced) once the broker confirmed a delta
  (``asyncloco-client join --journal``): these deltas were *promised*;
* the coordinator appends every settled outcome to ``applied.jsonl`` in its checkpoint directory,
  as part of each commit (see ``coordinator/applied_log.py``): these were *applied* or *rejected*.

After the run, with every process stopped: lost = confirmed − (applied ∪ rejected) must be empty,
no id may be applied twice, and nothing may be applied that no client confirmed.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pika
import redis

from coordinator.applied_log import FILENAME as APPLIED_LOG
from coordinator.checkpoint import load_checkpoint
from shared.keys import RunKeys
from shared.snapshot import SnapshotStore
from tests.services import AMQP_URL, REDIS_URL, ROOT, Processes, wait_for  # noqa: F401 - re-exported

T = TypeVar("T")

# The tiny model on a small corpus: a client round takes ~1 s on one CPU thread.
TASK = ["--model-size", "tiny", "--batch-size", "8", "--task-setting", "max_corpus_bytes=2000000",
        "--task-setting", "eval_sequences=16"]


def coordinator_args(run: str, checkpoint_dir: Path, *extra: str) -> list[str]:
    return ["-m", "coordinator.cli", "serve", "--run", run, *TASK, "--threads", "1",
            "--checkpoint-dir", str(checkpoint_dir), "--local-steps", "6", "--min-local-steps", "2",
            "--eval-interval", "5", *extra]


def client_args(run: str, client_id: str, state_dir: Path, journal: Path, max_seconds: float) -> list[str]:
    return ["-m", "client.cli", "join", "--run", run, "--client-id", client_id, "--threads", "1",
            "--device", "cpu", "--state-dir", str(state_dir), "--max-seconds", str(max_seconds),
            "--journal", str(journal), "--log-level", "info"]


def status(run: str) -> dict[str, Any]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw = client.get(RunKeys(run).status)
    finally:
        client.close()
    return json.loads(raw) if raw else {}


def read_journal(path: Path) -> list[str]:
    """Confirmed delta ids of one client, in confirm order (a torn last line is not an entry)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [line for line in text.split("\n")[:-1] if line]  # only newline-terminated lines


def read_applied(checkpoint_dir: Path, *, committed_only: bool = True) -> list[dict[str, Any]]:
    """Entries of the coordinator's applied log; by default only the bytes its checkpoint covers."""
    path = checkpoint_dir / APPLIED_LOG
    if not path.exists():
        return []
    data = path.read_bytes()
    if committed_only:
        checkpoint = load_checkpoint(checkpoint_dir)
        data = data[: int(checkpoint.state.get("applied_log_bytes", 0))] if checkpoint else b""
    return [json.loads(line) for line in data.decode().split("\n")[:-1] if line]


@dataclass
class Verdict:
    """The oracle's findings; ``ok`` when nothing was lost, doubled or invented."""

    confirmed: set[str]
    applied: Counter[str]
    rejected: dict[str, list[str]]  # id → reasons
    duplicates_seen: int  # redeliveries recognised and only acked (harmless, and expected here)
    lost: set[str] = field(default_factory=set)
    duplicated: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def summary(self) -> str:
        return (f"confirmed={len(self.confirmed)} applied={sum(self.applied.values())} "
                f"rejected={sum(len(r) for r in self.rejected.values())} "
                f"duplicates_recognised={self.duplicates_seen} lost={sorted(self.lost)} "
                f"duplicated={sorted(self.duplicated)} unexpected={sorted(self.unexpected)}")


def judge(confirmed: set[str], entries: list[dict[str, Any]]) -> Verdict:
    """Compare what clients were promised with what the coordinator committed."""
    applied: Counter[str] = Counter()
    rejected: dict[str, list[str]] = {}
    duplicates = 0
    for entry in entries:
        if entry["outcome"] == "applied":
            applied[entry["id"]] += 1
        elif entry["outcome"] == "rejected":
            rejected.setdefault(entry["id"], []).append(entry["reason"])
        else:
            duplicates += 1
    verdict = Verdict(confirmed, applied, rejected, duplicates)
    verdict.lost = confirmed - set(applied) - set(rejected)
    verdict.duplicated = {i for i, n in applied.items() if n > 1} | (set(applied) & set(rejected))
    verdict.unexpected = set(applied) - confirmed
    return verdict


def verify_snapshot(run: str) -> int:
    """Read and sha256-check the current snapshot in Redis; return its version."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return SnapshotStore(client, RunKeys(run)).read().version
    finally:
        client.close()


def queue_depth(run: str) -> int:
    """Ready messages in the run's delta queue (unacked ones return to it once consumers close)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(RunKeys(run).delta_queue, passive=True)
                   .method.message_count)
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
    assert len(pids) == 1, f"expected one connection named asyncloco-coordinator:{run}: {listing}"
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pids[0], "fault test"],
                   capture_output=True, text=True, timeout=60, check=True)
    return pids[0]
