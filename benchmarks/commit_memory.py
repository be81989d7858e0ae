"""What a commit costs in memory: the coordinator's peak RSS while it checkpoints and publishes,
against its steady RSS, and Redis's ``used_memory`` through many published versions.

Default: for each variant, a child process (this script with ``--child``) holds an outer
optimizer's state as the coordinator does (``make_outer_optimizer``: θ, momentum and buffer,
3 × ``--params`` float32, in ``--tensors`` flat tensors), makes one warm-up commit, reads its
steady VmRSS, then makes ``--commits`` commits, each the two big steps of ``Coordinator._commit``:
the checkpoint (temp file, fsync, rename) and the signed snapshot published to Redis. Before each
step the kernel's high-water mark is reset (``/proc/self/clear_refs``), and VmHWM read after it,
so the peak of each step is exact. ``before`` runs the code of before issue 13 inline
(safetensors ``save()`` to bytes, then written; the snapshot flattened whole, then cut into a
list of chunks, all in one pipeline); ``after`` runs ``coordinator.checkpoint.save_checkpoint``
and ``shared.snapshot.SnapshotStore.publish`` (both streamed from the tensors). The steady RSS is
that of this state alone: a real coordinator also holds its eval model and data, so its ratio is
lower still.

``--redis``: publishes ``--versions`` versions of a ``--redis-params`` model back to back (or one
every ``--interval`` seconds) through ``SnapshotStore`` with ``keep_versions`` 3, the coordinator's
default, and samples ``INFO memory`` ``used_memory`` every few ms from a second connection; the
row gives the peak above the empty server in snapshot bytes, against keep_versions + 1. Variants:
``before`` (the old publish inline: 4 MiB chunks, a version pushed out of the kept three expires
60 s after the flip), ``4MiB-del`` (4 MiB chunks, deleted at once before the next version is
written), ``after-flip`` (the default chunk size, just under 4 MiB, deleted at once after the
flip), ``after`` (the default chunk size, deleted at once before the next version is written).

The ``--redis`` half and the old publish live in ``commit_redis.py``. Both modes use a private
``redis-server`` on a free port (started and stopped by its pid here) unless ``--redis-url`` names
another; nothing else on the shared server is then counted.

    .venv/bin/python benchmarks/commit_memory.py                     # 50M: before, after; ~1 min
    .venv/bin/python benchmarks/commit_memory.py --redis             # 5M × 50 versions × 4; 15 s
    .venv/bin/python benchmarks/commit_memory.py --redis --variants after --versions 1000 --interval 0.25
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch
from commit_redis import (
    KEEP_VERSIONS,
    OLD_GRACE_S,
    REDIS_VARIANTS,
    RUN_ID,
    old_publish,
    redis_rows,
    start_redis,
)
from safetensors.torch import save
from served import memory_bytes, reset_peak
from table_csv import write_rows

from coordinator.checkpoint import FORMAT, Checkpoint, checkpoint_path, save_checkpoint
from coordinator.memory_trim import trim as trim_memory
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from harness.processes import new_run_name
from shared.keys import RunKeys
from shared.protocol import MiB
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore

SIZES = {"0.5M": 500_000, "5M": 5_000_000, "50M": 50_000_000, "100M": 100_000_000}
TARGET_RATIO = 1.3  # issue 13: peak RSS during a commit ≤ 1.3× steady with a 50M model


# ---------------------------------------------------------------- the code of before issue 13
def old_save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """coordinator/checkpoint.py save_checkpoint as it was (9907487): save() to bytes, then write."""
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(checkpoint.state, format=FORMAT)
    data = save({k: t.contiguous() for k, t in checkpoint.tensors.items()},
                metadata={"asyncloco": json.dumps(state)})
    tmp = directory / f".checkpoint.safetensors.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, checkpoint_path(directory))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------- memory of one process
def _kib(field: str) -> int:
    """This process's ``field`` of /proc/self/status (VmRSS, VmHWM) in KiB."""
    value = memory_bytes(os.getpid(), field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return value // 1024


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line."""
    torch.set_num_threads(1)
    numel = SIZES[args.params]
    sizes = [numel // args.tensors + (1 if i < numel % args.tensors else 0) for i in range(args.tensors)]
    generator = torch.Generator().manual_seed(0)
    theta = {f"layer{i}.weight": torch.empty(n).normal_(0, 0.02, generator=generator)
             for i, n in enumerate(sizes)}
    optimizer = make_outer_optimizer(theta, OuterConfig())  # copies θ; momentum, buffer
    del theta
    for group in (optimizer.momentum, optimizer.accum):
        for t in group.values():
            t.normal_(generator=generator)  # touched, as a running optimizer's are
    gc.collect()
    # The set-up's garbage (θ's first copy) may sit in glibc's heap; hand it back so that the
    # steady RSS is the state's own.
    trim_memory()
    client = redis.Redis.from_url(args.redis_url)
    keys = RunKeys(args.run)
    before = args.child == "before"
    store = SnapshotStore(client, keys, keep_versions=KEEP_VERSIONS, signer=SigningKey.generate(),
                          expire_grace_s=OLD_GRACE_S if before else 0)
    directory = Path(args.checkpoint_dir)

    def commit(version: int) -> tuple[int, int, float, float]:
        """One checkpoint and one publish: each step's peak VmRSS (KiB) and seconds."""
        optimizer.params[next(iter(optimizer.params))][0] += 1e-3  # θ moved by a delta
        checkpoint = Checkpoint(tensors=optimizer.tensors(), state={"version": version, "run": args.run})
        reset_peak()
        started = time.perf_counter()
        if before:
            old_save_checkpoint(directory, checkpoint)
        else:
            save_checkpoint(directory, checkpoint)
        checkpoint_s = time.perf_counter() - started
        checkpoint_peak = _kib("VmHWM")
        reset_peak()
        started = time.perf_counter()
        if before:
            old_publish(store, version=version, params=optimizer.params)
        else:
            store.publish(run_id=RUN_ID, version=version, params=optimizer.params, config={}, progress={})
        publish_s = time.perf_counter() - started
        return checkpoint_peak, _kib("VmHWM"), checkpoint_s, publish_s

    gc.collect()
    cold = _kib("VmRSS")
    commit(0)  # warm-up: first use of every code path
    gc.collect()
    steady = _kib("VmRSS")
    peaks = [commit(v) for v in range(1, args.commits + 1)]
    gc.collect()
    print(json.dumps({
        "cold_kib": cold, "steady_kib": steady, "after_kib": _kib("VmRSS"),
        "checkpoint_peak_kib": max(p[0] for p in peaks), "publish_peak_kib": max(p[1] for p in peaks),
        "checkpoint_s": min(p[2] for p in peaks), "publish_s": min(p[3] for p in peaks),
        "checkpoint_bytes": checkpoint_path(directory).stat().st_size,
        "snapshot_bytes": 4 * numel,
    }))
    client.close()


def memory_rows(args: argparse.Namespace, variants: list[str], redis_url: str) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        workdir = Path(tempfile.mkdtemp(prefix="bench-commit-"))
        try:
            result = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--params", args.params, "--tensors",
                 str(args.tensors), "--commits", str(args.commits), "--redis-url", redis_url,
                 "--run", new_run_name("bench-commit"), "--checkpoint-dir", str(workdir)],
                capture_output=True, text=True, timeout=1800, check=False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if result.returncode != 0:
            raise SystemExit(f"the {variant} child failed:\n{result.stderr}")
        got = json.loads(result.stdout.strip().splitlines()[-1])
        steady = got["steady_kib"]
        peak = max(got["checkpoint_peak_kib"], got["publish_peak_kib"])
        rows.append({
            "params": args.params, "tensors": args.tensors, "variant": variant, "commits": args.commits,
            "state_mib": round(3 * got["snapshot_bytes"] / MiB, 1),
            "cold_rss_mib": round(got["cold_kib"] / 1024, 1), "steady_rss_mib": round(steady / 1024, 1),
            "checkpoint_peak_mib": round(got["checkpoint_peak_kib"] / 1024, 1),
            "publish_peak_mib": round(got["publish_peak_kib"] / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1), "peak_over_steady": round(peak / steady, 3),
            "peak_over_cold": round(peak / got["cold_kib"], 3),
            "rss_after_mib": round(got["after_kib"] / 1024, 1),
            "checkpoint_s": round(got["checkpoint_s"], 2), "publish_s": round(got["publish_s"], 2),
            "checkpoint_mb": round(got["checkpoint_bytes"] / 1e6, 1),
        })
    return rows


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    print(" ".join(f"{title:>{max(len(title), 6)}}" for _, title, _ in columns))
    for row in rows:
        print(" ".join(f"{row[key]:>{max(len(title), 6)}{spec}}" for key, title, spec in columns), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", action="store_true", help="Redis used_memory through many versions")
    parser.add_argument("--variants", default="", help="comma list (default: every variant of the mode)")
    parser.add_argument("--params", default="50M", choices=list(SIZES), help="memory: the model's size")
    parser.add_argument("--tensors", type=int, default=8, help="tensors the model is cut into")
    parser.add_argument("--commits", type=int, default=3, help="memory: commits measured after a warm-up")
    parser.add_argument("--redis-params", default="5M", choices=list(SIZES), help="--redis: model size")
    parser.add_argument("--versions", type=int, default=50, help="--redis: versions published")
    parser.add_argument("--interval", type=float, default=0.0, help="--redis: seconds between publishes")
    parser.add_argument("--redis-url", default="", help="a Redis to use (default: a private redis-server)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="default results/commit_memory/commit_memory.csv (--redis: commit_redis.csv)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    known = list(REDIS_VARIANTS) if args.redis else ["before", "after"]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or known
    if set(variants) - set(known) or args.tensors < 1 or args.commits < 1 or args.versions < 1:
        parser.error(f"--variants takes a comma list of {', '.join(known)}; counts must be >= 1")
    if args.csv is None:
        args.csv = Path("results/commit_memory") / ("commit_redis.csv" if args.redis else "commit_memory.csv")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-commit-redis-"))
    server = None
    try:
        url = args.redis_url
        if not url:
            server, url = start_redis(workdir)
        if args.redis:
            print(f"Redis used_memory through {args.versions} published versions of a {args.redis_params} "
                  f"model (float32), keep_versions {KEEP_VERSIONS}, "
                  f"{'back to back' if not args.interval else f'one every {args.interval:g} s'}; "
                  "peak and end above the empty server, MB = 10^6 bytes")
            rows = redis_rows(args, variants, url, numel=SIZES[args.redis_params])
            print_table(rows, [("variant", "variant", ""), ("chunk_bytes", "chunk", ""),
                               ("grace_s", "grace_s", ""), ("deletion", "deletion", ""),
                               ("versions", "versions", ""),
                               ("seconds", "s", ".1f"), ("snapshot_mb", "snap_MB", ".1f"),
                               ("versions_left", "left", ""), ("peak_used_mb", "peak_MB", ".1f"),
                               ("end_used_mb", "end_MB", ".1f"), ("peak_in_snapshots", "peak/snap", ".2f"),
                               ("end_in_snapshots", "end/snap", ".2f"), ("bound_in_snapshots", "bound", "")])
            for row in rows:
                verdict = "met" if row["peak_in_snapshots"] <= row["bound_in_snapshots"] else "missed"
                print(f"target used_memory ≤ (kept + 1) × snapshot, {row['variant']}: "
                      f"{row['peak_in_snapshots']:.2f} ≤ {row['bound_in_snapshots']} ({verdict})")
        else:
            print(f"one coordinator's commit (checkpoint + snapshot publish), {args.params} parameters in "
                  f"{args.tensors} float32 tensors (θ, momentum, buffer: 3 copies); peaks are VmHWM of the "
                  "step; MiB")
            rows = memory_rows(args, variants, url)
            print_table(rows, [("variant", "variant", ""), ("state_mib", "state", ".1f"),
                               ("cold_rss_mib", "cold", ".1f"), ("steady_rss_mib", "steady", ".1f"),
                               ("checkpoint_peak_mib", "ckpt_peak", ".1f"),
                               ("publish_peak_mib", "pub_peak", ".1f"),
                               ("peak_over_steady", "peak/steady", ".3f"),
                               ("peak_over_cold", "peak/cold", ".3f"),
                               ("rss_after_mib", "after", ".1f"), ("checkpoint_s", "ckpt_s", ".2f"),
                               ("publish_s", "pub_s", ".2f")])
            for row in rows:
                verdict = "met" if row["peak_over_steady"] <= TARGET_RATIO else "missed"
                print(f"target peak ≤ {TARGET_RATIO}× steady, {row['params']} {row['variant']}: "
                      f"{row['peak_over_steady']:.3f}× ({verdict})")
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    write_rows(args.csv, rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.csv}")


if __name__ == "__main__":
    main()
