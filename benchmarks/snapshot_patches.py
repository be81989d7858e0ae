"""Snapshot patches (issue 12): what a client one or two versions behind downloads, what the
patches cost both sides, and what training from θ̂ instead of θ costs the run.

Two parts, each a table and a CSV:

* ``bytes``: a model of ``--params`` float32 parameters (10 tensors) published through the real
  ``SnapshotStore`` and ``PatchMaker`` on the local Redis for 4 versions (a random walk between
  them): for each patch codec, the bytes a client downloads to catch up from 1 and 2 versions
  behind against the whole fp32 snapshot, the coordinator's time to make a patch (encode + θ̂
  update) and to write it, and the client's time to read the patches (signature, hashes) and add
  them against its time to read the snapshot whole. Medians of ``--repeats``.
* ``training``: the simulator (the real round, codec, outer optimizer) with 4 workers at speeds
  ``--level`` on the tiny model, ``--budget`` local steps, workers starting each round from θ
  (``none``) or from θ̂, the model the patches carry (one patch each time θ moved since the last
  worker started: more patches, so more quantisation, than a coordinator that commits several
  deltas at once); final eval mean ± sd over ``--seeds`` and its gap to ``none``.

Targets (issue 12): a client one or two versions behind downloads ≤ 0.3 × the fp32 bytes; eval
loss impact measured (here: within 1% of ``none``).

    python benchmarks/snapshot_patches.py                        # 50M, seeds 0,1,2: ~6 min
    python benchmarks/snapshot_patches.py --parts bytes --params 5M
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis
import torch
from paper_table import parse_seeds, run_jobs
from table_csv import write_rows

from coordinator.patches import PatchMaker
from coordinator.sim.simulator import SimConfig, speed_profile
from shared.keys import RunKeys
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from shared.snapshot_patch import PATCH_CODECS, increments, read_patch_bytes, read_patch_manifest, write_patch

TARGET_BYTES_SHARE = 0.3  # of the fp32 snapshot, for a client 1 or 2 versions behind
TARGET_LOSS_GAP_PCT = 1.0
MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bytes,training", help="comma list: bytes, training")
    parser.add_argument("--params", default="50M", help="model size for the bytes part, e.g. 5M, 50M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", default=",".join(PATCH_CODECS))
    parser.add_argument("--budget", type=int, default=480, help="total local steps per simulated run")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--level", default="very", help="heterogeneity of the simulated workers")
    parser.add_argument("--strategy", default="edn+dylu")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="parallel simulator processes")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("results/snapshot_patches"))
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not parts or parts - {"bytes", "training"}:
        parser.error("--parts takes a comma list of bytes, training")
    if not codecs or set(codecs) - set(PATCH_CODECS):
        parser.error(f"--codecs takes a comma list of {', '.join(PATCH_CODECS)}")
    try:
        numel = int(float(args.params.rstrip("mM")) * 1e6) if args.params[-1:] in "mM" else int(args.params)
    except ValueError:
        parser.error(f"--params takes a count like 5M or 50M, not {args.params!r}")
    if args.repeats < 1 or numel < 10:
        parser.error("--repeats must be >= 1 and --params >= 10")
    seeds = parse_seeds(parser, args.seeds)
    if "bytes" in parts:
        rows = [bytes_row(args.redis, codec, numel, args.repeats) for codec in codecs]
        print_bytes(rows, numel, args.repeats)
        write_rows(args.out / "bytes.csv", rows)
    if "training" in parts:
        rows = training(codecs, seeds, args)
        write_rows(args.out / "training.csv", rows)
    print(f"wrote {args.out}/")


def bytes_row(url: str, codec: str, numel: int, repeats: int) -> dict[str, Any]:
    """Publish 4 versions with patches in ``codec``; time and count one client's catch-ups."""
    client = redis.Redis.from_url(url)
    gen = torch.Generator().manual_seed(0)
    theta = {f"w{i}": torch.randn(numel // 10, generator=gen) * 0.05 for i in range(10)}
    samples: dict[str, list[float]] = {k: [] for k in ("make_s", "write_s", "full_s", "one_s", "two_s")}
    sizes: dict[str, int] = {}
    try:
        for _ in range(repeats):
            keys = RunKeys(f"bench-patch-{uuid.uuid4().hex[:8]}")
            try:
                _catch_ups(SnapshotStore(client, keys, keep_versions=4, signer=SigningKey.generate()),
                           PatchMaker(codec), theta, gen, samples, sizes)
            finally:
                for name in client.scan_iter(match=f"{keys.prefix}*"):
                    client.delete(name)
    finally:
        client.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    one, two = sizes["one"] / sizes["full"], sizes["two"] / sizes["full"]
    return {"codec": codec, "params": numel, "full_mb": round(sizes["full"] / MB, 2),
            "one_behind_mb": round(sizes["one"] / MB, 2), "one_behind_share": round(one, 4),
            "two_behind_mb": round(sizes["two"] / MB, 2), "two_behind_share": round(two, 4),
            "make_s": round(med["make_s"], 3), "write_s": round(med["write_s"], 3),
            "full_read_s": round(med["full_s"], 3), "one_behind_s": round(med["one_s"], 3),
            "two_behind_s": round(med["two_s"], 3), "target_met": max(one, two) <= TARGET_BYTES_SHARE}


def _catch_ups(store: SnapshotStore, maker: PatchMaker, theta: dict[str, torch.Tensor], gen: torch.Generator,
               samples: dict[str, list[float]], sizes: dict[str, int]) -> None:
    """Versions 0..3 as the publisher writes them; then a client reads 3 whole, and catches up
    from 2 and from 1 by patches (on the tensors it read: the bytes and the work are the same)."""
    for version in range(4):
        if version:
            for t in theta.values():
                t.add_(1e-3 * torch.randn(t.shape, generator=gen))
        started = time.perf_counter()
        made = maker.patch(run=store.keys.run, run_id="bench", version=version, created_at=float(version),
                           params=theta)
        if made is not None:
            samples["make_s"].append(time.perf_counter() - started)
            started = time.perf_counter()
            write_patch(store, *made)
            samples["write_s"].append(time.perf_counter() - started)
        store.publish(run_id="bench", version=version, params=theta, config={}, progress={},
                      created_at=float(version))
        maker.published(version, float(version))
    started = time.perf_counter()
    snapshot = store.read(3)
    samples["full_s"].append(time.perf_counter() - started)
    sizes["full"] = snapshot.manifest.total_bytes
    for behind, label in ((1, "one"), (2, "two")):
        started = time.perf_counter()
        got = 0
        for version in range(4 - behind, 4):
            manifest = read_patch_manifest(store, version)
            buffer = read_patch_bytes(store, manifest)
            got += len(buffer)
            for name, increment in increments(manifest, buffer):
                snapshot.params[name].add_(increment)
        samples[f"{label}_s"].append(time.perf_counter() - started)
        sizes[label] = got


def print_bytes(rows: list[dict[str, Any]], numel: int, repeats: int) -> None:
    print(f"catching up: {numel / 1e6:g}M float32 parameters, the local Redis, medians of {repeats}")
    print(f"{'codec':<6} {'fp32 MB':>8} {'1 behind MB':>12} {'× fp32':>7} {'2 behind MB':>12} "
          f"{'× fp32':>7} {'make s':>7} {'write s':>8} {'whole read s':>13} {'1 behind s':>11} "
          f"{'2 behind s':>11} {'target':>7}")
    for r in rows:
        print(f"{r['codec']:<6} {r['full_mb']:>8.1f} {r['one_behind_mb']:>12.2f} "
              f"{r['one_behind_share']:>7.3f} {r['two_behind_mb']:>12.2f} {r['two_behind_share']:>7.3f} "
              f"{r['make_s']:>7.3f} {r['write_s']:>8.3f} {r['full_read_s']:>13.3f} "
              f"{r['one_behind_s']:>11.3f} {r['two_behind_s']:>11.3f} "
              f"{'met' if r['target_met'] else 'missed':>7}")
    print(f"target: ≤ {TARGET_BYTES_SHARE} × the fp32 bytes for a client 1 or 2 versions behind")


def training(codecs: list[str], seeds: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = SimConfig(strategy=args.strategy, speeds=tuple(speed_profile(args.level, 4)),
                     local_steps=args.local_steps, min_local_steps=5, budget_steps=args.budget,
                     eval_every_steps=max(40, args.budget // 8), codec="int3")
    variants = ["none", *codecs]
    jobs = [(f"{v}/{seed}", replace(base, patches=v, seed=seed), {"model_size": "tiny"}, 0)
            for v in variants for seed in seeds]
    results = run_jobs(jobs, args.jobs)
    print(f"\ntraining from θ̂: {args.strategy}, 4 workers at {args.level}, tiny model, H={args.local_steps}, "
          f"{args.budget} local steps, int3 deltas, seeds {seeds}")
    print(f"{'patches':<8} {'updates':>9} {'final eval':>16} {'vs none':>8} {'target':>7}")
    none_mean = statistics.fmean(results[f"none/{s}"].final_loss for s in seeds)
    rows = []
    for variant in variants:
        finals = [results[f"{variant}/{s}"].final_loss for s in seeds]
        mean = statistics.fmean(finals)
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        gap = 100 * (mean / none_mean - 1)
        updates = "/".join(str(results[f"{variant}/{s}"].curve[-1].updates) for s in seeds)
        met = gap <= TARGET_LOSS_GAP_PCT
        rows.append({"patches": variant, "seeds": len(seeds), "updates": updates,
                     "final_mean": round(mean, 5), "final_sd": round(sd, 5), "gap_vs_none_pct": round(gap, 2),
                     "finals": "/".join(f"{f:.4f}" for f in finals), "target_met": met})
        verdict = "met" if met else "missed"
        print(f"{variant:<8} {updates:>9} {mean:>9.4f} ± {sd:.3f} {gap:>7.2f}% {verdict:>7}")
    print(f"target: eval loss ≤ {TARGET_LOSS_GAP_PCT}% above training from θ itself")
    return rows


if __name__ == "__main__":
    main()
