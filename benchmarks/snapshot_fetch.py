"""Snapshot downloads (issue 12): how close a client's fetch comes to raw Redis, and its memory.

For a model of ``--params`` float32 parameters (in 10 tensors) published once through the real
``SnapshotStore`` (signed, 4 MiB chunks) on the local Redis, each repeat measures in a fresh process:

* ``raw``: the same chunk keys read with plain ``GET``s, one after another, bytes dropped: the
  ceiling of this Redis and link for those bytes;
* ``fetch``: ``SnapshotStore.read`` as the client does it (manifest and signature checked, every
  chunk's sha256, the tensors built);
* the fetch's peak resident memory above the process's before it (VmHWM after resetting it
  through ``/proc/self/clear_refs``), in multiples of the model's fp32 bytes.

Targets (issue 12): fetch ≥ 70% of raw; the client's peak ≤ 3.5× the fp32 model (here: the
fetch's share of it). Medians over ``--repeats``; ratios from the same run.

    python benchmarks/snapshot_fetch.py                      # 50M parameters, 3 repeats: ~1 min
    python benchmarks/snapshot_fetch.py --params 5M --repeats 5

Prints a table and writes a CSV (``--out``). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
import torch
from served import memory_bytes, reset_peak
from table_csv import write_rows

from shared.keys import RunKeys
from shared.signing import SigningKey, VerifyKey
from shared.snapshot import SnapshotStore

MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="50M", help="parameters, e.g. 5M, 50M, 100M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("results/snapshot_fetch/snapshot_fetch.csv"))
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.probe is not None:
        print(json.dumps(_probe(args.redis, *json.loads(args.probe))))
        return
    try:
        numel = _count(args.params)
    except ValueError:
        parser.error(f"--params takes a count like 5M or 50M, not {args.params!r}")
    if args.repeats < 1 or numel < 10:
        parser.error("--repeats must be >= 1 and --params >= 10")
    client = redis.Redis.from_url(args.redis)
    keys = RunKeys(f"bench-fetch-{uuid.uuid4().hex[:8]}")
    key = SigningKey.generate()
    try:
        params = {f"w{i}": torch.randn(numel // 10) for i in range(10)}
        SnapshotStore(client, keys, signer=key).publish(run_id="bench", version=1, params=params,
                                                        config={}, progress={})
        del params
        rows = []
        for repeat in range(args.repeats):
            probe = json.dumps([keys.run, key.public_hex])
            done = subprocess.run([sys.executable, __file__, "--redis", args.redis, "--probe", probe],
                                  capture_output=True, text=True, timeout=600, check=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"repeat": repeat, "params": numel, **measured})
    finally:
        for name in client.scan_iter(match=f"{keys.prefix}*"):
            client.delete(name)
    model_mb = numel * 4 / MB
    raw = statistics.median(r["raw_mb_s"] for r in rows)
    fetch = statistics.median(r["fetch_mb_s"] for r in rows)
    peak = statistics.median(r["fetch_peak_mb"] for r in rows) / model_mb
    print(f"{numel / 1e6:g}M float32 parameters ({model_mb:.0f} MB), {args.repeats} repeats, medians")
    print(f"{'raw GET MB/s':>14} {'fetch MB/s':>12} {'fetch/raw':>10} {'fetch peak / model':>20}")
    print(f"{raw:>14.1f} {fetch:>12.1f} {fetch / raw:>10.2f} {peak:>20.2f}")
    print(f"target fetch ≥ 0.70 × raw: {'met' if fetch / raw >= 0.7 else 'missed'}; "
          f"target peak ≤ 3.5 × model: {'met' if peak <= 3.5 else 'missed'}")
    write_rows(args.out, [{**r, "model_mb": round(model_mb, 1)} for r in rows])
    print(f"wrote {args.out}")


def _probe(url: str, run: str, public_hex: str) -> dict[str, float]:
    """In a fresh process: raw GETs of the chunks, then the client's read, and its peak memory."""
    client = redis.Redis.from_url(url)
    keys = RunKeys(run)
    store = SnapshotStore(client, keys, verify_key=VerifyKey.from_hex(public_hex))  # as a client's
    version = store.current_version()
    assert version is not None
    manifest = store.read_manifest(version)
    chunk_keys = [keys.chunk(version, i) for i in range(len(manifest.chunk_sha256))]
    started = time.perf_counter()
    got = sum(len(client.get(name) or b"") for name in chunk_keys)
    raw_s = time.perf_counter() - started
    before = memory_bytes(os.getpid(), "VmRSS") or 0
    reset_peak()
    started = time.perf_counter()
    snapshot = store.read(version)
    fetch_s = time.perf_counter() - started
    peak = memory_bytes(os.getpid(), "VmHWM") or 0
    assert sum(t.numel() for t in snapshot.params.values()) * 4 == got
    return {"raw_mb_s": round(got / MB / raw_s, 1), "fetch_mb_s": round(got / MB / fetch_s, 1),
            "fetch_s": round(fetch_s, 3), "fetch_peak_mb": round((peak - before) / MB, 1)}


def _count(text: str) -> int:
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


if __name__ == "__main__":
    main()
