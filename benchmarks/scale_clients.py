"""One process of ``scale.py``'s lightweight clients: many volunteers, one thread each, no training.

Each client does what a volunteer's round does on the wire, with the client's own parts: it reads
the run's current version, that version's signed manifest and the round plan
(:class:`client.fetcher.SnapshotFetcher`; the whole snapshot too with ``--fetch-snapshots``),
"trains" for ``--interval`` seconds (± ``--jitter``: a sleep), and sends a delta of the manifest's
shapes on that base with :class:`client.uploader.DeltaUploader` (publisher confirms, parts past 8
MiB, retries with the client's own backoff while the broker refuses), under its own client id and
increasing seqs. Its next round waits for a version newer than its last base, as a real client
waits for a snapshot that includes its own delta (the coordinator takes one delta per base).

The deltas pass the coordinator's guard as honest ones do: every client's delta is one direction
shared by all (the same seed everywhere) plus noise of its own (one of ``--variants`` per process),
scaled by the round length the plan assigned it over H (the guard judges a short round's delta at
full-round size). A process encodes each (round length, variant) once and reuses the bytes.

Started by ``scale.py`` (never by hand): it writes ``--ready`` once its payloads are made, waits for
``--go`` (JSON: unix ``start_at`` and ``stop_at``, the same for every process), stops at
``stop_at`` or on SIGTERM, and writes what each client did to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch
from ceilings import PART_BYTES
from served import honest_tensor

from client.fetcher import SnapshotFetcher
from client.stop import StopRequested
from client.uploader import DeltaUploader
from harness.processes import AMQP_URL, REDIS_URL
from shared.codecs import get_codec
from shared.errors import SnapshotError
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings, RetryPolicy
from shared.signing import VerifyKey
from shared.snapshot_layout import SnapshotManifest

log = logging.getLogger("scale_clients")

BATCH, SEQ_LEN = 8, 128  # what the deltas claim per local step (samples, tokens): counted, never checked
BASE_POLL_S = 0.1  # how often a client looks for a version newer than its last base
GO_WAIT_S = 900.0  # the longest a process waits for --go before it gives up


class Payloads:
    """Encoded deltas of the run's shapes, one per (round length, noise variant), made on first use
    and shared by the process's clients. Made one tensor at a time, so the fp32 model is never
    held whole (a 100M model's int8 delta is 101 MB; its fp32 form would be 400 MB)."""

    def __init__(self, *, codec: str, scale: float, process: int) -> None:
        self.codec, self.scale, self.process = get_codec(codec), scale, process
        self.lock = threading.Lock()
        self.made: dict[tuple[int, int], dict[str, bytes]] = {}

    def get(self, manifest: SnapshotManifest, *, steps: int, full_steps: int,
            variant: int) -> dict[str, bytes]:
        with self.lock:
            key = (steps, variant)
            if key not in self.made:
                size = self.scale * steps / max(1, full_steps)  # a short round moves θ less
                tensors = {}
                for i, entry in enumerate(manifest.params):
                    g = honest_tensor(i, entry.numel, own_seed=self.process * 1000 + variant, scale=size)
                    tensors[entry.name] = self.codec.encode(g)
                self.made[key] = tensors
            return self.made[key]


class Client:
    """One volunteer's rounds on the wire (module docstring); its tallies for the report."""

    def __init__(self, client_id: str, *, args: argparse.Namespace, variant: int, redis_client: redis.Redis,
                 payloads: Payloads, stop: threading.Event) -> None:
        self.client_id, self.args, self.variant, self.payloads, self.stop = (
            client_id, args, variant, payloads, stop)
        keys = RunKeys(args.run)
        retry = RetryPolicy()  # the volunteer's own backoff (0.5 s doubling to 15 s) while the broker refuses
        self.fetcher = SnapshotFetcher(redis_client, keys, retry=retry, should_stop=stop.is_set,
                                       verify_key=VerifyKey.from_hex(args.coordinator_key))
        self.uploader = DeltaUploader(ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL), keys=keys,
                                      retry=retry, part_bytes=PART_BYTES)
        self.rng = random.Random(f"{args.seed}-{client_id}")
        self.confirmed: list[str] = []
        self.upload_s: list[float] = []
        self.fetch_s: list[float] = []
        self.base_wait_s = 0.0
        self.error = ""

    def run(self, start_at: float, stop_at: float) -> None:
        try:
            self.uploader.connect()
            # clients start spread over one interval, as volunteers do not join in step
            self._sleep_until(start_at + self.rng.uniform(0, self.args.interval))
            last_base, held = -1, -1
            while not self.stop.is_set() and time.time() < stop_at:
                version = self._newer_than(last_base)
                if version is None:
                    break
                try:
                    manifest = self.fetcher.manifest(version)
                except SnapshotError:  # pushed out of the kept versions meanwhile: take the next
                    continue
                if self.args.fetch_snapshots and version > held:
                    started = time.monotonic()
                    snapshot = self.fetcher.read_latest()  # whole, sha256- and signature-checked
                    self.fetch_s.append(time.monotonic() - started)
                    version, manifest, held = snapshot.version, snapshot.manifest, snapshot.version
                    del snapshot
                plan = self.fetcher.plan()
                full = plan.local_steps if plan is not None else 1
                steps = plan.assignments.get(self.client_id, full) if plan is not None else 1
                round_s = self.args.interval * self.rng.uniform(1 - self.args.jitter, 1 + self.args.jitter)
                self._sleep_until(time.time() + round_s)  # the round's training
                if self.stop.is_set() or time.time() >= stop_at:
                    break
                tensors = self.payloads.get(manifest, steps=steps, full_steps=full, variant=self.variant)
                message = DeltaMessage(
                    run_id=manifest.run_id, client_id=self.client_id, seq=len(self.confirmed),
                    base_version=version, local_steps=steps, samples=steps * BATCH,
                    tokens=steps * BATCH * SEQ_LEN, compute_s=round_s, train_loss=2.0,
                    codec=self.payloads.codec.name, tensors=tensors, sent_at=time.time(), device="scale.py")
                upload = self.uploader.send(message,
                                            give_up=lambda: self.stop.is_set() or time.time() >= stop_at)
                if not upload.confirmed:
                    break  # stopped while the broker still refused it: never promised
                self.confirmed.append(message.delta_id)
                self.upload_s.append(upload.upload_s)
                last_base = version
        except StopRequested:  # a wait of the fetcher's, ended by the stop
            pass
        except Exception as exc:  # one client's failure is reported, not the process's end
            log.exception("client %s failed", self.client_id)
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.uploader.close()

    def _newer_than(self, base: int) -> int | None:
        """The current version once it is newer than ``base`` (None on a stop)."""
        started = time.monotonic()
        try:
            while not self.stop.is_set():
                version = self.fetcher.current_version()
                if version is not None and version > base:
                    return version
                self.uploader.keepalive()
                self.stop.wait(BASE_POLL_S)
            return None
        finally:
            self.base_wait_s += time.monotonic() - started

    def _sleep_until(self, at: float) -> None:
        while not self.stop.is_set() and (left := at - time.time()) > 0:
            self.stop.wait(min(left, 5.0))
            self.uploader.keepalive()

    def report(self) -> dict[str, Any]:
        return {"confirmed": self.confirmed, "upload_s": [round(s, 4) for s in self.upload_s],
                "fetch_s": [round(s, 4) for s in self.fetch_s], "base_wait_s": round(self.base_wait_s, 2),
                "error": self.error}


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--coordinator-key", required=True, help="the run's public key, hex")
    parser.add_argument("--process", type=int, required=True, help="this process's index (client ids, noise)")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--jitter", type=float, default=0.25)
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1e-4)
    parser.add_argument("--fetch-snapshots", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # a full queue (the coordinator behind) refuses publishes and the uploader retries: expected here
    logging.getLogger("client.uploader").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    redis_client = redis.Redis.from_url(REDIS_URL, socket_timeout=30)
    payloads = Payloads(codec=args.codec, scale=args.scale, process=args.process)
    clients = [Client(f"s{args.process}-{i}", args=args, variant=i % args.variants, redis_client=redis_client,
                      payloads=payloads, stop=stop) for i in range(args.clients)]
    # the full round's payloads before the start: the first rounds do not wait for them
    probe = clients[0].fetcher
    manifest = probe.manifest(probe.wait_for_version(0.5))
    plan = probe.wait_for_plan(0.5)
    for variant in range(min(args.variants, args.clients)):
        payloads.get(manifest, steps=plan.local_steps, full_steps=plan.local_steps, variant=variant)
    args.ready.write_text("ready\n")
    deadline = time.monotonic() + GO_WAIT_S
    while not args.go.exists():
        if stop.wait(0.1) or time.monotonic() > deadline:
            raise SystemExit("scale_clients: stopped before the go")
    go = json.loads(args.go.read_text())
    threads = [threading.Thread(target=c.run, args=(go["start_at"], go["stop_at"]), name=c.client_id,
                                daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    while time.time() < go["stop_at"] and not stop.is_set():
        stop.wait(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=max(1.0, 60 - (time.time() - go["stop_at"])))
    redis_client.close()
    report = {"process": args.process, "clients": {c.client_id: c.report() for c in clients},
              "late": [t.name for t in threads if t.is_alive()], "peak_rss_bytes": _peak_rss_bytes()}
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
