"""``intake.py --broker``: delta intake end to end, through RabbitMQ into a real coordinator process.

``intake.py``'s docstring says what is measured; this module runs it: the publisher processes (the
client's own uploader), the samples of the coordinator's status and /metrics clocks, the broker's
raw ceiling for the same message size right after, and the table.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from ceilings import PART_BYTES, broker_rows
from served import cpu_seconds, first_snapshot, free_port, honest_payloads, scrape
from table_csv import write_rows

from client.uploader import DeltaUploader
from coordinator.run_admin import delete_run
from harness.faults import coordinator_args, status
from harness.processes import AMQP_URL, REDIS_URL, Processes, new_run_name, wait_for
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings, RetryPolicy
from shared.snapshot import SnapshotStore

BROKER_MODELS = {"tiny": "0.45M", "small": "4.8M"}  # the bytelm sizes a coordinator can serve
BROKER_STEPS = 6  # the --local-steps of harness.faults.coordinator_args
QUEUE_BYTES = 256 * 1024 * 1024  # the queue's bound: past it the broker refuses publishes (backpressure)
# the coordinator's own clocks (/metrics): seconds in the intake (applied deltas), commits, publishes
CLOCKS = {"intake": "asyncloco_delta_apply_seconds", "commit": "asyncloco_commit_seconds",
          "publish": "asyncloco_snapshot_publish_seconds"}


def broker_message(run_id: str, client_id: str, seq: int, version: int, codec: str,
                   tensors: dict[str, bytes]) -> DeltaMessage:
    return DeltaMessage(run_id=run_id, client_id=client_id, seq=seq, base_version=version,
                        local_steps=BROKER_STEPS, samples=48, tokens=48 * 128, compute_s=1.0, train_loss=2.0,
                        codec=codec, tensors=tensors)


def publish_deltas(run: str, run_id: str, index: int, ids: int, payloads: list[dict[str, bytes]], codec: str,
                   queues: int, start: Any, stop: Any, confirmed: Any) -> None:
    """One publisher process: deltas under ``ids`` client ids in turn, each on the newest version
    (an id waits for a version newer than its last base: one delta per base), sent as a client
    sends them, until ``stop``; ``confirmed`` counts the confirmed ones."""
    keys = RunKeys(run)
    # a full queue (the coordinator behind) refuses publishes and the uploader retries: expected here
    logging.getLogger("client.uploader").setLevel(logging.ERROR)
    uploader = DeltaUploader(ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL), keys=keys,
                             retry=RetryPolicy(max_delay_s=1.0), part_bytes=PART_BYTES)
    client = redis.Redis.from_url(REDIS_URL)
    last_base = {f"p{index}-{i}": -1 for i in range(ids)}
    seqs = dict.fromkeys(last_base, 0)
    try:
        uploader.connect()
        start.wait()
        while not stop.is_set():
            version = int(client.get(keys.current) or 0)
            name = next((n for n, base in last_base.items() if base < version), None)
            if name is None:
                time.sleep(0.005)
                continue
            message = broker_message(run_id, name, seqs[name], version, codec, payloads[seqs[name] % 2])
            uploader.queue = keys.delta_queue_for(name, queues)  # as the worker routes by the plan
            if uploader.send(message, give_up=stop.is_set).confirmed:
                with confirmed.get_lock():
                    confirmed.value += 1
            last_base[name], seqs[name] = version, seqs[name] + 1
    finally:
        uploader.close()
        client.close()


def _sample(run: str, pid: int, port: int, confirmed: Any) -> dict[str, Any]:
    """The coordinator's applied count (at its status document's time), its clocks and CPU
    seconds, the machine's idle seconds, the publishers' confirmed deltas."""
    doc, tick, metrics = status(run), os.sysconf("SC_CLK_TCK"), scrape(port)
    with open("/proc/stat") as fh:
        machine = [int(v) for v in fh.readline().split()[1:]]  # cpu: user nice system idle iowait ...
    return {"at": float(doc["updated_at"]), "applied": doc["deltas"]["applied"], "doc": doc,
            **{f"{k}_{part}": metrics.get(f"{name}_{part}", 0.0) for k, name in CLOCKS.items()
               for part in ("sum", "count")},
            "cpu_s": cpu_seconds(pid), "idle_s": (machine[3] + machine[4]) / tick,
            "wall": time.time(), "confirmed": confirmed.value}


def through_broker(model: str, codec: str, *, publishers: int, ids: int, seconds: float, warmup_s: float,
                   workdir: Path, queues: int = 1) -> dict[str, Any]:
    """One row: a real coordinator serving ``model``, fed by ``publishers`` processes."""
    run = new_run_name("bench-intake")
    (workdir / run).mkdir(parents=True)
    procs, client, port = Processes(workdir / run), redis.Redis.from_url(REDIS_URL), free_port()
    context = multiprocessing.get_context("fork")  # the children only publish: no torch
    start, stop, confirmed = context.Event(), context.Event(), context.Value("i", 0)
    workers: list[Any] = []
    try:
        coordinator = procs.start("coordinator", *coordinator_args(
            run, workdir / run / "checkpoint", "--model-size", model, "--max-deltas-per-minute", "0",
            "--max-staleness", "1000000", "--eval-interval", "3600", "--no-dylu",
            "--max-queue-bytes", str(QUEUE_BYTES), "--metrics-port", str(port),
            "--delta-queues", str(queues)))
        snapshot = wait_for(lambda: first_snapshot(SnapshotStore(client, RunKeys(run))), timeout_s=120,
                            what="the coordinator's first snapshot")
        assert snapshot is not None
        run_id = snapshot.manifest.run_id
        payloads = honest_payloads({n: p.shape for n, p in snapshot.params.items()}, codec, scale=1e-4)
        body_bytes = len(broker_message(run_id, "p0-0", 0, 0, codec, payloads[0]).encode())
        workers = [context.Process(target=publish_deltas,
                                   args=(run, run_id, i, ids, payloads, codec, queues, start, stop,
                                         confirmed))
                   for i in range(publishers)]
        for worker in workers:
            worker.start()
        start.set()
        time.sleep(warmup_s)
        first = _sample(run, coordinator.pid, port, confirmed)
        time.sleep(seconds)
        last = _sample(run, coordinator.pid, port, confirmed)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
        procs.stop_all()
        try:
            delete_run(client, ConnectionSettings(amqp_url=AMQP_URL), run, force=True)
        finally:
            client.close()
            shutil.rmtree(workdir / run, ignore_errors=True)
    # the raw ceiling for this message size (bigger deltas go in parts of --part-bytes), right after
    raw = broker_rows(AMQP_URL, new_run_name("bench-ceilings"), mb=48.0, repeats=3, publishers=[publishers],
                      timeout_s=60.0, sizes={"delta": min(body_bytes, PART_BYTES)})
    ceiling = min(r["mb_per_s"] for r in raw)
    wall = last["wall"] - first["wall"]
    applied = (last["applied"] - first["applied"]) / (last["at"] - first["at"])  # the status's own clock
    spent = {k: last[f"{k}_sum"] - first[f"{k}_sum"] for k in CLOCKS}
    counted = {k: max(1.0, last[f"{k}_count"] - first[f"{k}_count"]) for k in CLOCKS}
    deltas = last["doc"]["deltas"]
    return {
        "model": model, "params": BROKER_MODELS[model], "codec": codec, "queues": queues,
        "publishers": publishers,
        "client_ids": publishers * ids, "body_mb": round(body_bytes / 1e6, 3), "seconds": round(wall, 1),
        "applied_per_s": round(applied, 2), "applied_mb_per_s": round(applied * body_bytes / 1e6, 1),
        "confirmed_per_s": round((last["confirmed"] - first["confirmed"]) / wall, 2),
        "broker_ceiling_mb_per_s": ceiling,
        "share_of_ceiling": round(applied * body_bytes / 1e6 / ceiling, 3),
        "queue_depth_end": last["doc"]["queue"]["depth"], "rejected": deltas["rejected"],
        "rejected_by_reason": " ".join(f"{k}={v}" for k, v in deltas["rejected_by_reason"].items()),
        "intake_ms_per_delta": round(1000 * spent["intake"] / counted["intake"], 2),
        "commits_per_s": round(counted["commit"] / wall, 2),
        "commit_ms": round(1000 * spent["commit"] / counted["commit"], 1),
        **{f"{k}_share": round(spent[k] / wall, 3) for k in CLOCKS},
        # parts spooled to disk and put together, the loop, waiting: outside both clocks
        "other_share": round(1 - (spent["intake"] + spent["commit"]) / wall, 3),
        "coordinator_cpu": round((last["cpu_s"] - first["cpu_s"]) / wall, 2),
        "machine_idle": round((last["idle_s"] - first["idle_s"]) / wall / (os.cpu_count() or 1), 2),
    }


def broker_main(args: argparse.Namespace, models: list[str], codecs: list[str]) -> None:
    started = time.perf_counter()
    print(f"intake through RabbitMQ into one coordinator process (one thread), {args.publishers} "
          f"publishers, {args.seconds:g} s after {args.warmup:g} s of warm-up; MB = 10^6 bytes")
    columns = [("model", "model", "<6"), ("params", "params", ">6"), ("codec", "codec", "<5"),
               ("queues", "queues", ">6"),
               ("body_mb", "MB", ">6.2f"), ("applied_per_s", "applied/s", ">9.1f"),
               ("applied_mb_per_s", "MB/s", ">6.1f"), ("broker_ceiling_mb_per_s", "ceiling", ">7.1f"),
               ("share_of_ceiling", "share", ">6.0%"), ("confirmed_per_s", "sent/s", ">7.1f"),
               ("queue_depth_end", "depth", ">6"), ("intake_ms_per_delta", "ms/delta", ">8.1f"),
               ("intake_share", "intake", ">6.0%"), ("commit_share", "commit", ">6.0%"),
               ("other_share", "other", ">5.0%"),
               ("coordinator_cpu", "CPU", ">5.0%"), ("machine_idle", "idle", ">5.0%")]
    print(" ".join(f"{title:{spec[:2]}}" for _, title, spec in columns))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        for model in models:
            for codec in codecs:
                for queues in args.delta_queues:
                    row = through_broker(model, codec, publishers=args.publishers, ids=args.ids,
                                         seconds=args.seconds, warmup_s=args.warmup, workdir=Path(tmp),
                                         queues=queues)
                    rows.append(row)
                    print(" ".join(f"{row[key]:{spec}}" for key, _, spec in columns), flush=True)
    print("ceiling: confirmed publishes by as many processes, or one consumer, whichever is slower, for a "
          "message of the delta's size (8 MiB parts for bigger ones); intake, commit, other (parts, the "
          "loop, waiting): shares of the coordinator's wall time; CPU: its CPU seconds per second; "
          "idle: the machine's")
    for row in rows:
        verdict = "met" if row["share_of_ceiling"] >= 0.8 else "missed"
        print(f"target applied MB/s ≥ 80% of the broker ceiling, {row['model']} {row['codec']}: "
              f"{row['share_of_ceiling']:.0%} ({verdict})")
    write_rows(args.csv, rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.csv}")
