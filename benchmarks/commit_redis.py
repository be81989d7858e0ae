"""``commit_memory.py --redis``: Redis's ``used_memory`` through many published versions; the
snapshot publish of before issue 13 that both halves of ``commit_memory.py`` measure against; a
private ``redis-server``. ``commit_memory.py``'s docstring says what is measured."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch
from served import free_port

from coordinator.patches import PatchMaker
from harness.processes import new_run_name, wait_for
from shared.keys import RunKeys
from shared.protocol import MiB
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import DEFAULT_CHUNK_BYTES, SnapshotManifest, byte_views
from shared.snapshot_patch import DEFAULT_PATCH_CODEC, write_patch

KEEP_VERSIONS = 3  # CommitConfig's default
OLD_CHUNK_BYTES = 4 * MiB
OLD_GRACE_S = 60
RUN_ID = "bench-commit"


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


def redis_rows(args: argparse.Namespace, variants: list[str], url: str, *,
               numel: int) -> list[dict[str, Any]]:
    """A row per variant: ``args.versions`` versions of a model of ``numel`` float32 parameters
    published through Redis at ``url``, and Redis's ``used_memory`` through them."""
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


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of our own (no persistence), and its URL."""
    port = free_port()
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
