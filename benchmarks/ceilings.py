"""Ceilings of this machine's Redis and RabbitMQ, in MB/s, for the payloads asyncloco moves.

Redis carries snapshots (``shared/snapshot.py``): chunks of ``DEFAULT_CHUNK_BYTES`` (4 MiB), a
0.5M-parameter model's whole snapshot in one 2 MB chunk, written in one pipeline per version and
read 16 chunks per MGET. Measured: SET and GET of one value of each size, and a pipelined SET and
one MGET of 16 chunks.

RabbitMQ carries deltas (``client/uploader.py`` → ``coordinator/consumer.py``): messages of the
size of a 0.5M- and a 5M-parameter model's delta in int8 and fp16, and the 8 MiB parts
(``--part-bytes``) that bigger deltas travel in (5M fp16: 2 parts; 50M: 7 in int8, 12 in fp16).
The queue is declared as a run's delta queue (``coordinator.consumer.declare_queues``: durable,
quorum, reject-publish), the messages persistent, published through the run's exchange with
publisher confirms, each publish waiting for its confirm as the uploader does, by one publisher
and by ``--publishers`` processes at once; then consumed by one consumer with the coordinator's
prefetch, each message acked.

Every figure is the median over ``--repeats`` of about ``--mb`` MB moved (1 MB = 10^6 bytes).
Only 127.0.0.1 (or the URLs of ASYNCLOCO_TEST_REDIS / ASYNCLOCO_TEST_AMQP); every key, queue and
exchange it makes is deleted at the end, and each phase gives up after ``--phase-timeout`` s.

    .venv/bin/python benchmarks/ceilings.py                 # ~1 min
    .venv/bin/python benchmarks/ceilings.py --repeats 5 --publishers 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import redis
from table_csv import write_rows

from coordinator.consumer import QueueConfig, declare_queues
from harness.processes import AMQP_URL, REDIS_URL
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.snapshot_layout import DEFAULT_CHUNK_BYTES

MiB = 1024 * 1024
PART_BYTES = 8 * MiB  # the client's default --part-bytes
SNAPSHOT_BATCH = 16  # chunks per MGET in SnapshotStore.read
# label -> bytes of one message on the wire (payload; the msgpack envelope adds < 4 KiB)
DELTA_SIZES = {
    "0.5M int8": get_codec("int8").encoded_bytes(500_000),
    "0.5M fp16": get_codec("fp16").encoded_bytes(500_000),
    "5M int8": get_codec("int8").encoded_bytes(5_000_000),
    "8 MiB part": PART_BYTES,
}
CHUNK_SIZES = {"0.5M snapshot": 4 * 500_000, "4 MiB chunk": DEFAULT_CHUNK_BYTES}


class PhaseTimeout(Exception):
    pass


def rate(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


# ---------------------------------------------------------------- Redis
def redis_rows(client: redis.Redis, keys: RunKeys, made: list[str], *, mb: float, repeats: int,
               timeout_s: float) -> list[dict[str, Any]]:
    rows = []
    for index, (label, size) in enumerate(CHUNK_SIZES.items()):
        value = os.urandom(size)
        count = max(2, round(mb * 1e6 / size))
        key = keys.chunk(0, index)
        made.append(key)

        def set_all(value: bytes = value, key: str = key, count: int = count) -> None:
            for _ in range(count):
                client.set(key, value)

        def get_all(key: str = key, count: int = count, size: int = size) -> None:
            for _ in range(count):
                got = client.get(key)
                assert got is not None and len(got) == size

        rows.append(_row("redis", "SET", label, size, count, repeats, set_all, timeout_s))
        rows.append(_row("redis", "GET", label, size, count, repeats, get_all, timeout_s))
    # a snapshot's chunks as the store moves them: one pipeline of SETs, one MGET per 16 chunks
    chunk = os.urandom(DEFAULT_CHUNK_BYTES)
    batch = [keys.chunk(1, i) for i in range(SNAPSHOT_BATCH)]
    made.extend(batch)
    rounds = max(1, round(mb * 1e6 / (SNAPSHOT_BATCH * DEFAULT_CHUNK_BYTES)))

    def pipeline_set() -> None:
        for _ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for key in batch:
                pipe.set(key, chunk)
            pipe.execute()

    def mget() -> None:
        for _ in range(rounds):
            got = client.mget(batch)
            assert all(g is not None and len(g) == DEFAULT_CHUNK_BYTES for g in got)

    label = f"{SNAPSHOT_BATCH} × 4 MiB"
    rows.append(_row("redis", "pipelined SET", label, SNAPSHOT_BATCH * DEFAULT_CHUNK_BYTES, rounds, repeats,
                     pipeline_set, timeout_s))
    rows.append(_row("redis", "MGET", label, SNAPSHOT_BATCH * DEFAULT_CHUNK_BYTES, rounds, repeats, mget,
                     timeout_s))
    return rows


def _row(server: str, op: str, label: str, size: int, count: int, repeats: int, run: Callable[[], None],
         timeout_s: float, publishers: int = 1) -> dict[str, Any]:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        if seconds > timeout_s:
            raise PhaseTimeout(f"{server} {op} {label} took {seconds:.0f} s")
        rates.append(rate(size * count, seconds))
    return _record(server, op, label, size, count, publishers, rates)


def _record(server: str, op: str, label: str, size: int, count: int, publishers: int,
            rates: list[float]) -> dict[str, Any]:
    median = statistics.median(rates)
    return {"server": server, "op": op, "payload": label, "bytes": size, "messages": count,
            "publishers": publishers, "repeats": len(rates), "mb_per_s": round(median, 1),
            "msgs_per_s": round(median * 1e6 / size, 1), "min_mb_per_s": min(rates),
            "max_mb_per_s": max(rates)}


# ---------------------------------------------------------------- RabbitMQ
def _connection(amqp_url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(amqp_url)
    params.socket_timeout = 10.0
    params.blocked_connection_timeout = 30.0
    params.heartbeat = 60
    return pika.BlockingConnection(params)


def publish_share(amqp_url: str, run: str, size: int, count: int, index: int, ready: Any, start: Any,
                  finished: Any) -> None:
    """One publisher process: ``count`` persistent messages of ``size`` bytes, each confirmed
    before the next (the uploader's way), once ``start`` is set; its time.monotonic() at the
    last confirm goes to ``finished[index]``."""
    keys = RunKeys(run)
    connection = _connection(amqp_url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        user = pika.URLParameters(amqp_url).credentials.username
        body = os.urandom(size)
        with ready.get_lock():
            ready.value += 1
        start.wait()
        for i in range(count):
            channel.basic_publish(
                exchange=keys.delta_exchange, routing_key=keys.delta_queue, body=body, mandatory=True,
                properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                                message_id=f"{index}:{i}", user_id=user),
            )
        finished[index] = time.monotonic()
    finally:
        connection.close()


def publish(amqp_url: str, run: str, size: int, count: int, publishers: int, timeout_s: float) -> float:
    """Seconds from the start signal to the last confirm of ``publishers`` processes publishing
    ``count`` messages in all (connected beforehand: connecting is not timed)."""
    context = multiprocessing.get_context("fork")  # nothing to import again; the children use no torch
    shares = [count // publishers + (1 if i < count % publishers else 0) for i in range(publishers)]
    shares = [n for n in shares if n]
    ready, start, finished = context.Value("i", 0), context.Event(), context.Array("d", len(shares))
    procs = [context.Process(target=publish_share, args=(amqp_url, run, size, n, i, ready, start, finished))
             for i, n in enumerate(shares)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    while ready.value < len(procs) and time.monotonic() < deadline and all(p.is_alive() for p in procs):
        time.sleep(0.01)
    started = time.monotonic()
    start.set()
    for proc in procs:
        proc.join(max(0.1, deadline + timeout_s - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    for proc in stuck:
        proc.terminate()
        proc.join(5)
    if stuck or any(p.exitcode != 0 for p in procs):
        raise PhaseTimeout(f"publishing {count} × {size} B: {len(stuck)} publishers stuck, "
                           f"exit codes {[p.exitcode for p in procs]}")
    return max(finished[:]) - started


def consume(channel: Any, keys: RunKeys, count: int, prefetch: int, timeout_s: float) -> float:
    """Seconds for one consumer to receive and ack ``count`` messages."""
    received = 0

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        nonlocal received
        ch.basic_ack(method.delivery_tag)
        received += 1

    channel.basic_qos(prefetch_count=prefetch)
    started = time.perf_counter()
    tag = channel.basic_consume(keys.delta_queue, on_message_callback=on_message, auto_ack=False)
    try:
        while received < count:
            if time.perf_counter() - started > timeout_s:
                raise PhaseTimeout(f"consumed {received} of {count} messages in {timeout_s:.0f} s")
            channel.connection.process_data_events(time_limit=0.05)
        return time.perf_counter() - started
    finally:
        channel.basic_cancel(tag)


def broker_rows(amqp_url: str, run: str, *, mb: float, repeats: int, publishers: list[int],
                timeout_s: float, sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Publish and consume rows for each message size of ``sizes`` (label -> bytes; the deltas'
    by default), on run ``run``'s delta queue and exchange, deleted at the end."""
    keys, config = RunKeys(run), QueueConfig()
    connection = _connection(amqp_url)
    rows = []
    try:
        channel = connection.channel()
        declare_queues(channel, keys, config)
        for label, size in (sizes or DELTA_SIZES).items():
            count = max(4, round(mb * 1e6 / size))
            consumed = []
            for n in publishers:
                published = []
                for _ in range(repeats):
                    published.append(rate(size * count, publish(amqp_url, run, size, count, n, timeout_s)))
                    seconds = consume(channel, keys, count, config.prefetch, timeout_s)
                    consumed.append(rate(size * count, seconds))
                rows.append(_record("rabbitmq", "publish+confirm", label, size, count, n, published))
            rows.append(_record("rabbitmq", "consume+ack", label, size, count, 1, consumed))
    finally:
        if connection.is_open:
            connection.close()
        delete_broker_names(amqp_url, keys)
    return rows


def delete_broker_names(amqp_url: str, keys: RunKeys) -> None:
    """Delete the queues and exchanges of ``keys`` (on a connection of its own: the measuring one
    may be the one that failed)."""
    connection = _connection(amqp_url)
    try:
        channel = connection.channel()
        for queue in (keys.delta_queue, keys.dead_letter_queue):
            channel.queue_delete(queue)
        for exchange in (keys.delta_exchange, keys.dead_letter_exchange):
            channel.exchange_delete(exchange)
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64.0, help="MB moved per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--publishers", default="1,4", help="comma list of concurrent publisher counts")
    parser.add_argument("--phase-timeout", type=float, default=60.0, help="seconds a measurement may take")
    parser.add_argument("--skip", default="", help="redis or rabbitmq: leave that server out")
    parser.add_argument("--csv", type=Path, default=Path("results/ceilings/ceilings.csv"))
    args = parser.parse_args()
    try:
        publishers = [int(n) for n in args.publishers.split(",") if n.strip()]
    except ValueError:
        parser.error("--publishers takes a comma list of integers")
    if not publishers or min(publishers) < 1 or args.repeats < 1 or args.mb <= 0:
        parser.error("--publishers, --repeats and --mb must be positive")
    run = f"bench-ceilings-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.skip != "redis":
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=args.phase_timeout)
        made: list[str] = []
        try:
            rows += redis_rows(client, RunKeys(run), made, mb=args.mb, repeats=args.repeats,
                               timeout_s=args.phase_timeout)
        finally:
            if made:
                client.delete(*made)
            client.close()
    if args.skip != "rabbitmq":
        rows += broker_rows(AMQP_URL, run, mb=args.mb, repeats=args.repeats, publishers=publishers,
                            timeout_s=args.phase_timeout)
    print(f"ceilings on this machine ({os.cpu_count()} cores), medians over {args.repeats} repeats of "
          f"~{args.mb:g} MB; MB = 10^6 bytes")
    print(f"{'server':<9} {'op':<16} {'payload':<14} {'bytes':>9} {'n':>4} {'pubs':>4} {'MB/s':>8} "
          f"{'msgs/s':>8} {'min-max MB/s':>14}")
    for r in rows:
        print(f"{r['server']:<9} {r['op']:<16} {r['payload']:<14} {r['bytes']:>9} {r['messages']:>4} "
              f"{r['publishers']:>4} {r['mb_per_s']:>8.1f} {r['msgs_per_s']:>8.1f} "
              f"{r['min_mb_per_s']:>6.1f}-{r['max_mb_per_s']:<7.1f}")
    write_rows(args.csv, rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.csv}")


if __name__ == "__main__":
    main()
