"""Loopback throughput of one big delta sent in parts, with 1 and with several confirms outstanding.

The client's own uploader (``client/uploader.py``: publisher confirms, persistent messages, the
run's exchange and its durable quorum queue declared as the coordinator declares it) sends one
delta message of about ``--mb`` MB (fp32 bytes, 1 MB = 10^6 bytes) in ``--part-bytes`` parts
(8 MiB, the client's default), with ``max_unconfirmed`` 1 (each part waits for the confirm of the
one before) and with each of ``--windows`` (4, the client's default). The time is the uploader's
own ``upload_s``: from the encoded delta message until the broker confirmed its last part (the
SHA-256 of the delta, cutting and encoding each part included). The row ``before`` is the uploader
as it was: the parts of ``split_delta`` published on a channel in pika's own blocking confirm mode
(``BlockingChannel.confirm_delivery()``), each ``basic_publish`` returning with its confirm. The
queue is purged after each upload, so every one starts from an empty queue. Runs alternate between
the rows, so that a machine busy with something else slows each alike; the table gives the median
over ``--repeats`` and the ratio of each row's median throughput to ``before``'s.

Only 127.0.0.1 (or ASYNCLOCO_TEST_AMQP); the queues and exchanges it makes are deleted at the end.

    .venv/bin/python benchmarks/part_upload.py               # ~15 s
    .venv/bin/python benchmarks/part_upload.py --windows 2,4,8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import pika
from table_csv import write_rows

from client.uploader import APP_ID, CONTENT_TYPE, DeltaUploader
from coordinator.consumer import QueueConfig, declare_queues
from harness.processes import AMQP_URL
from shared.delta_parts import PART_TYPE, split_delta
from shared.keys import RunKeys
from shared.protocol import DeltaMessage, MiB
from shared.settings import ConnectionSettings, RetryPolicy, amqp_parameters

RESULTS = Path(__file__).resolve().parent / "results" / "part_upload"
BEFORE = 0  # the row of the uploader as it was (pika's blocking confirms)


def send_as_before(channel: Any, keys: RunKeys, message: DeltaMessage, part_bytes: int, user: str) -> float:
    """Seconds to send ``message`` in parts as the uploader did before: each publish on ``channel``,
    in pika's blocking confirm mode, returning with its own confirm (the same properties; timed as
    ``upload_s`` is, from after the delta message is encoded)."""
    body = message.encode()
    started = time.monotonic()
    for part in split_delta(body, part_bytes=part_bytes, run_id=message.run_id, client_id=message.client_id,
                            seq=message.seq):
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type=CONTENT_TYPE, app_id=APP_ID,
            message_id=f"{message.delta_id}/{part.index}", type=PART_TYPE, user_id=user)
        channel.basic_publish(exchange=keys.delta_exchange, routing_key=keys.delta_queue, body=part.encode(),
                              properties=properties, mandatory=True)
    return time.monotonic() - started


def delta_of(mb: float, seq: int) -> DeltaMessage:
    """A delta message of about ``mb`` MB of fp32 payload (random-looking bytes, as a delta's are)."""
    payload = os.urandom(int(mb * 1e6) // 4 * 4)
    return DeltaMessage(run_id="bench", client_id="bench-client", seq=seq, base_version=0, local_steps=1,
                        samples=1, tokens=1, compute_s=1.0, train_loss=1.0, codec="fp32",
                        tensors={"w": payload}, sent_at=time.time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="MB of delta payload")
    parser.add_argument("--part-bytes", type=int, default=8 * MiB)
    parser.add_argument("--windows", default="4", help="comma list of outstanding confirms besides 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=RESULTS / "part_upload.csv")
    args = parser.parse_args()
    try:
        windows = sorted({1, *(int(n) for n in args.windows.split(",") if n.strip())})
    except ValueError:
        parser.error("--windows takes a comma list of integers")
    if min(windows) < 1 or args.repeats < 1 or args.mb <= 0:
        parser.error("--windows, --repeats and --mb must be positive")

    keys = RunKeys(f"bench-parts-{uuid.uuid4().hex[:8]}")
    admin = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = admin.channel()
    declare_queues(channel, keys, QueueConfig())
    settings = ConnectionSettings(amqp_url=AMQP_URL)
    user = amqp_parameters(settings).credentials.username
    before = pika.BlockingConnection(amqp_parameters(settings))
    blocking = before.channel()
    blocking.confirm_delivery()  # each basic_publish returns with its confirm
    uploaders = {w: DeltaUploader(settings, keys=keys, retry=RetryPolicy(), part_bytes=args.part_bytes,
                                  max_unconfirmed=w) for w in windows}
    rows_in_turn = [BEFORE, *windows]
    seconds: dict[int, list[float]] = {w: [] for w in rows_in_turn}
    started = time.perf_counter()
    message = delta_of(args.mb, seq=0)
    body_bytes = len(message.encode())
    parts = -(-body_bytes // args.part_bytes)
    try:
        for uploader in uploaders.values():  # every connection open before anything is timed
            uploader.connect()
        uploaders[1].send(message)  # a warm-up, not timed
        channel.queue_purge(keys.delta_queue)
        for _ in range(args.repeats):
            for row in rows_in_turn:
                if row == BEFORE:
                    seconds[row].append(send_as_before(blocking, keys, message, args.part_bytes, user))
                else:
                    upload = uploaders[row].send(message)
                    assert upload.confirmed and upload.body_bytes == body_bytes
                    seconds[row].append(upload.upload_s)
                channel.queue_purge(keys.delta_queue)
    finally:
        for uploader in uploaders.values():
            uploader.close()
        before.close()
        for queue in (keys.delta_queue, keys.dead_letter_queue):
            channel.queue_delete(queue)
        for exchange in (keys.delta_exchange, keys.dead_letter_exchange):
            channel.exchange_delete(exchange)
        admin.close()

    base = body_bytes / statistics.median(seconds[BEFORE]) / 1e6
    rows: list[dict[str, Any]] = []
    for row in rows_in_turn:
        median_s = statistics.median(seconds[row])
        mb_per_s = body_bytes / median_s / 1e6
        rows.append({"uploader": "before" if row == BEFORE else "now",
                     "outstanding_confirms": 1 if row == BEFORE else row,
                     "delta_mb": round(body_bytes / 1e6, 1), "parts": parts,
                     "part_mib": round(args.part_bytes / MiB, 2), "repeats": args.repeats,
                     "median_s": round(median_s, 3), "min_s": round(min(seconds[row]), 3),
                     "max_s": round(max(seconds[row]), 3), "mb_per_s": round(mb_per_s, 1),
                     "ratio": round(mb_per_s / base, 2)})
    print(f"one {body_bytes / 1e6:.1f} MB delta in {parts} parts of {args.part_bytes / MiB:g} MiB over "
          f"loopback ({os.cpu_count()} cores), median of {args.repeats}; MB = 10^6 bytes; ratio: to before")
    print(f"{'uploader':<8} {'confirms':>8} {'median s':>9} {'min-max s':>13} {'MB/s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['uploader']:<8} {r['outstanding_confirms']:>8} {r['median_s']:>9.3f} "
              f"{r['min_s']:>6.3f}-{r['max_s']:<6.3f} {r['mb_per_s']:>8.1f} {r['ratio']:>6.2f}")
    write_rows(args.csv, rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.csv}")


if __name__ == "__main__":
    main()
