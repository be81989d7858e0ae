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

Both modes use a private ``redis-server`` on a free port (started and stopped by its pid here)
unless ``--redis-url`` names another; nothing else on the shared server is then counted.

    .venv/bin/python benchmarks/commit_memory.py                     # 50M: before, after; ~1 min
    .venv/bin/python benchmarks/commit_memory.py --redis             # 5M × 50 versions × 4; 15 s
    .venv/bin/python benchmarks/commit_memory.py --redis --variants after --versions 1000 --interval 0.25
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch
from safetensors.torch import save
from served import reset_peak
from table_csv import write_rows

from coordinator.checkpoint import FORMAT, Checkpoint, checkpoint_path, save_checkpoint
from coordinator.memory_trim import trim as trim_memory
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from coordinator.patches import PatchMaker
from harness.processes import new_run_name, wait_for
from shared.keys import RunKeys
from shared.protocol import MiB
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import DEFAULT_CHUNK_BYTES, SnapshotManifest, byte_views
from shared.snapshot_patch import DEFAULT_PATCH_CODEC, write_patch

SIZES = {"0.5M": 500_000, "5M": 5_000_000, "50M": 50_000_000, "100M": 100_000_000}
TARGET_RATIO = 1.3  # issue 13: peak RSS during a commit ≤ 1.3× steady with a 50M model
KEEP_VERSIONS = 3  # CommitConfig's default
OLD_CHUNK_BYTES = 4 * MiB
OLD_GRACE_S = 60
RUN_ID = "bench-commit"


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


def old_publish(store: SnapshotStore, *, version: int, params: dict[str, torch.Tensor]) -> None:
    """shared/snapshot.py SnapshotStore.publish as it was (9907487): the flat bytes whole, a list
    of 4 MiB chunks cut from them, every chunk in one pipeline; old versions expire after 60 s."""
    parts = []
    for tensor in params.values():
        t = tensor.detach().to("cpu").contiguous()
        parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    entries = byte_views(params)[0]
    flat = b"".join(parts)
    del parts  # (the old flatten() returned here, dropping its list)
    chunks = [flat[i : i + OLD_CHUNK_BYTES] for i in range(0, len(flat), OLD_CHUNK_BYTES)]
    manifest = SnapshotManifest(run=store.keys.run, run_id=RUN_ID, version=version, params=entries,
                                chunk_bytes=OLD_CHUNK_BYTES,
                                chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
                                config={}, progress={}, created_at=time.time())
    signed = store.signed(manifest.encode())
    pipe = store.redis.pipeline(transaction=False)
    for index, chunk in enumerate(chunks):
        pipe.set(store.keys.chunk(version, index), chunk)
    pipe.set(store.keys.manifest(version), signed)
    pipe.execute()
    store._flip(keys=[store.keys.current], args=[version, 0])
    store._drop(version - store.keep_versions)  # after the flip; with expire_grace_s=60: the old EXPIRE


# ---------------------------------------------------------------- memory of one process
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


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
        checkpoint_peak = _status_kib("VmHWM")
        reset_peak()
        started = time.perf_counter()
        if before:
            old_publish(store, version=version, params=optimizer.params)
        else:
            store.publish(run_id=RUN_ID, version=version, params=optimizer.params, config={}, progress={})
        publish_s = time.perf_counter() - started
        return checkpoint_peak, _status_kib("VmHWM"), checkpoint_s, publish_s

    gc.collect()
    cold = _status_kib("VmRSS")
    commit(0)  # warm-up: first use of every code path
    gc.collect()
    steady = _status_kib("VmRSS")
    peaks = [commit(v) for v in range(1, args.commits + 1)]
    gc.collect()
    print(json.dumps({
        "cold_kib": cold, "steady_kib": steady, "after_kib": _status_kib("VmRSS"),
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


# ---------------------------------------------------------------- Redis memory
class UsedMemory(threading.Thread):
    """Samples Redis's used_memory every ``every_s`` from its own connection; keeps the peak."""

    def __init__(self, url: str, every_s: float = 0.003) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.every_s = every_s
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()

    def now(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            self.samples += 1
            self.stop.wait(self.every_s)


class DropAfterFlip(SnapshotStore):
    """Publishing as first written for this issue: ``v - keep_versions`` deleted after ``v``'s
    flip (so ``keep_versions`` + 1 snapshots while ``v`` is written), not before ``v``'s chunks."""

    def publish(self, **kwargs: Any) -> SnapshotManifest:  # type: ignore[override]
        keep, self.keep_versions = self.keep_versions, 2**62  # nothing deleted inside
        try:
            manifest = super().publish(**kwargs)
        finally:
            self.keep_versions = keep
        self._drop(kwargs["version"] - keep)
        return manifest


REDIS_VARIANTS = {  # chunk bytes, grace of versions pushed out of the kept ones, how they go
    "before": (OLD_CHUNK_BYTES, OLD_GRACE_S, "old"),
    "4MiB-del": (OLD_CHUNK_BYTES, 0, "before-write"),
    "after-flip": (DEFAULT_CHUNK_BYTES, 0, "after-flip"),
    "after": (DEFAULT_CHUNK_BYTES, 0, "before-write"),
    # as "after", each version with its int4 patch from the one before (the coordinator's default)
    "patches": (DEFAULT_CHUNK_BYTES, 0, "patches"),
}


def redis_rows(args: argparse.Namespace, variants: list[str], url: str) -> list[dict[str, Any]]:
    numel = SIZES[args.redis_params]
    sizes = [numel // args.tensors + (1 if i < numel % args.tensors else 0) for i in range(args.tensors)]
    generator = torch.Generator().manual_seed(0)
    params = {f"layer{i}.weight": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    snapshot_bytes = 4 * numel
    client = redis.Redis.from_url(url)
    rows = []
    try:
        for variant in variants:
            chunk_bytes, grace_s, deletion = REDIS_VARIANTS[variant]
            keys = RunKeys(new_run_name("bench-commit-redis"))
            kind = DropAfterFlip if deletion == "after-flip" else SnapshotStore
            store = kind(client, keys, keep_versions=KEEP_VERSIONS, expire_grace_s=grace_s,
                         signer=SigningKey.generate())
            sampler = UsedMemory(url)
            baseline = sampler.now()
            sampler.start()
            patches = PatchMaker(DEFAULT_PATCH_CODEC) if deletion == "patches" else None
            started = time.perf_counter()
            for version in range(args.versions):
                params["layer0.weight"][0] = float(version)  # every version its own bytes
                made = patches and patches.patch(run=keys.run, run_id=RUN_ID, version=version,
                                                 created_at=float(version), params=params)
                if made:
                    write_patch(store, *made)
                if deletion == "old":
                    old_publish(store, version=version, params=params)
                else:
                    store.publish(run_id=RUN_ID, version=version, params=params, config={}, progress={},
                                  chunk_bytes=chunk_bytes, created_at=float(version))
                if patches:
                    patches.published(version, float(version))
                if args.interval:
                    time.sleep(args.interval)
            seconds = time.perf_counter() - started
            time.sleep(0.05)
            sampler.stop.set()
            sampler.join()
            end = sampler.now()
            live = sum(1 for v in range(args.versions) if client.exists(keys.manifest(v)))
            peak = sampler.peak - baseline
            rows.append({
                "params": args.redis_params, "variant": variant, "chunk_bytes": chunk_bytes,
                "grace_s": grace_s, "deletion": deletion, "versions": args.versions,
                "seconds": round(seconds, 1),
                "snapshot_mb": round(snapshot_bytes / 1e6, 1), "keep_versions": KEEP_VERSIONS,
                "versions_left": live, "peak_used_mb": round(peak / 1e6, 1),
                "end_used_mb": round((end - baseline) / 1e6, 1),
                "peak_in_snapshots": round(peak / snapshot_bytes, 2),
                "end_in_snapshots": round((end - baseline) / snapshot_bytes, 2),
                "bound_in_snapshots": KEEP_VERSIONS + 1, "samples": sampler.samples,
            })
            sampler.client.close()
            client.delete(*client.keys(f"*{keys.run}*") or ["-"])  # its own run's keys only
            wait_for(lambda: sampler.now() < baseline + snapshot_bytes, timeout_s=90,  # noqa: B023
                     what="Redis to free the run's keys")
    finally:
        client.close()
    return rows


# ---------------------------------------------------------------- a private Redis
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of our own (no persistence), and its URL."""
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(workdir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, timeout_s=20, what="the private redis-server")
    finally:
        probe.close()
    return server, url


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
            rows = redis_rows(args, variants, url)
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
