"""Delta codecs (issue 12): bytes per update, encode and decode speed, eval loss at equal updates.

For each codec (``shared/codecs.py``):

* bytes per parameter and MB per update of the ``small`` bytelm model (4.87M parameters, its own
  tensor shapes), and that as a share of fp32's;
* encode, decode and error-feedback encode speed (``ErrorFeedback.encode``: encode plus the
  decode that keeps the residual, what a client pays each round) on that model's tensors filled
  with Gaussian values of 1e-3; MB/s of the fp32 delta (numel × 4 / 1e6 bytes per second), the
  median over ``--repeats``, one process, ``--threads`` torch threads;
* the simulator's final eval loss (``coordinator.sim.simulator``: the project's own round, codec
  with error feedback and outer optimizer) with 4 equal-speed workers on the tiny model for
  ``--budget`` total local steps, so every codec gets the same number of applied updates; mean
  over ``--seeds``, and its gap to fp32's mean.

Target (issue 12): a codec at ≤ 1/8 of fp32's bytes with eval loss within 1% of fp32's. The
table says, for each codec, whether it meets it.

    python benchmarks/codecs.py                     # 5 codecs, seed 0: ~5 min on 2 cores
    python benchmarks/codecs.py --seeds 0,1,2       # 3 seeds: ~15 min
    python benchmarks/codecs.py --codecs int4,topk --repeats 3
    python benchmarks/codecs.py --speed-only        # bytes and speeds, no simulator: ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from paper_table import parse_seeds, run_jobs
from table_csv import write_rows

from coordinator.sim.simulator import SimConfig, SimResult, speed_profile
from shared.codecs import CODECS, get_codec
from shared.error_feedback import ErrorFeedback
from shared.tasks.bytelm import MODEL_SIZES, ByteTransformer

TARGET_BYTES_SHARE = 1 / 8  # of fp32's bytes
TARGET_LOSS_GAP_PCT = 1.0  # eval loss at most this much above fp32's
SPEED_MODEL = "small"  # the ~5M-parameter bytelm model


def model_tensors(size: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The named parameters of bytelm ``size``, refilled with N(0, 1e-3²) values: a stand-in delta."""
    gen = torch.Generator().manual_seed(seed)
    model = ByteTransformer(MODEL_SIZES[size])
    return {name: torch.randn(p.shape, generator=gen) * 1e-3 for name, p in model.named_parameters()}


def measure_speed(codec_name: str, tensors: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Bytes and median encode / decode / error-feedback encode MB/s of one codec on ``tensors``."""
    codec = get_codec(codec_name)
    numel = sum(t.numel() for t in tensors.values())
    fp32_mb = 4 * numel / 1e6
    feedback = ErrorFeedback(codec)
    encode_s, decode_s, feedback_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        blobs = {name: codec.encode(t) for name, t in tensors.items()}
        encode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for name, blob in blobs.items():
            codec.decode(blob, tensors[name].numel())
        decode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for name, t in tensors.items():
            feedback.encode(name, t)
        feedback_s.append(time.perf_counter() - started)
    update_bytes = sum(len(b) for b in blobs.values())
    return {
        "codec": codec_name,
        "bytes_per_param": round(update_bytes / numel, 4),
        "update_mb": round(update_bytes / 1e6, 3),
        "vs_fp32_bytes": round(update_bytes / (4 * numel), 4),
        "encode_mb_s": round(fp32_mb / statistics.median(encode_s), 1),
        "decode_mb_s": round(fp32_mb / statistics.median(decode_s), 1),
        "feedback_encode_mb_s": round(fp32_mb / statistics.median(feedback_s), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="fp32,fp16,int8,int4,int3,topk", help="comma list, fp32 included")
    parser.add_argument("--budget", type=int, default=480, help="total local steps per simulated run")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--seeds", default="0", help="comma list of simulator seeds")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per codec (the median counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the speed measurement")
    parser.add_argument("--jobs", type=int, default=2, help="parallel simulator processes")
    parser.add_argument("--out", type=Path, default=Path("results/codecs"))
    parser.add_argument("--speed-only", action="store_true",
                        help="bytes and speeds only, no simulator runs (writes speed.csv)")
    args = parser.parse_args()
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if "fp32" not in codecs or set(codecs) - set(CODECS):
        parser.error(f"--codecs takes a comma list of {', '.join(CODECS)}, fp32 included")
    seeds = parse_seeds(parser, args.seeds)
    if args.repeats < 1 or args.threads < 1:
        parser.error("need at least one repeat and one thread")

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    tensors = model_tensors(SPEED_MODEL)
    speeds = {}
    for codec in codecs:
        speeds[codec] = measure_speed(codec, tensors, args.repeats)
        print(f"  timed {codec:<5} {speeds[codec]['encode_mb_s']:>8.1f} MB/s encode", flush=True)
    if args.speed_only:
        params = sum(t.numel() for t in tensors.values())
        print(f"\nbytes and speed: bytelm {SPEED_MODEL} ({params / 1e6:.2f}M params), {args.threads} "
              f"thread(s), median of {args.repeats}; MB/s of the fp32 delta")
        print(f"{'codec':<6} {'B/param':>8} {'vs fp32':>8} {'enc MB/s':>9} {'dec MB/s':>9} {'EF MB/s':>8}")
        for codec, speed in speeds.items():
            print(f"{codec:<6} {speed['bytes_per_param']:>8.4f} {speed['vs_fp32_bytes']:>8.4f} "
                  f"{speed['encode_mb_s']:>9.1f} {speed['decode_mb_s']:>9.1f} "
                  f"{speed['feedback_encode_mb_s']:>8.1f}")
        write_rows(args.out / "speed.csv", list(speeds.values()))
        print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/speed.csv")
        return

    base = SimConfig(speeds=tuple(speed_profile("none", 4)), local_steps=args.local_steps, min_local_steps=5,
                     budget_steps=args.budget, eval_every_steps=max(40, args.budget // 8))
    jobs = [(f"{codec}/{seed}", replace(base, codec=codec, seed=seed), {"model_size": "tiny"}, 0)
            for codec in codecs for seed in seeds]
    results = run_jobs(jobs, args.jobs)

    runs = [{"codec": label.split("/")[0], "seed": label.split("/")[1], "final_eval": round(r.final_loss, 5),
             "updates": r.curve[-1].updates, "local_steps": r.curve[-1].local_steps}
            for label, r in results.items()]
    write_rows(args.out / "runs.csv", runs)
    write_rows(args.out / "codecs.csv", _table(speeds, results, codecs, seeds, args))
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/codecs.csv and runs.csv")


def _table(speeds: dict[str, dict[str, Any]], results: dict[str, SimResult], codecs: list[str],
           seeds: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    params = sum(t.numel() for t in model_tensors(SPEED_MODEL).values())
    print()
    print(f"bytes and speed: bytelm {SPEED_MODEL} ({params / 1e6:.2f}M params), {args.threads} thread(s), "
          f"median of {args.repeats}; eval: 4 equal-speed workers, tiny model, H={args.local_steps}, "
          f"{args.budget} local steps, seeds {seeds}")
    print(f"{'codec':<6} {'B/param':>8} {'MB/update':>9} {'vs fp32':>8} {'enc MB/s':>9} {'dec MB/s':>9} "
          f"{'EF MB/s':>8} {'updates':>7} {'final eval':>16} {'vs fp32':>8} {'target':>7}")
    fp32_mean = statistics.fmean(results[f"fp32/{s}"].final_loss for s in seeds)
    rows = []
    for codec in codecs:
        finals = [results[f"{codec}/{s}"].final_loss for s in seeds]
        mean = statistics.fmean(finals)
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        gap = 100 * (mean / fp32_mean - 1)
        updates = sorted({results[f"{codec}/{s}"].curve[-1].updates for s in seeds})
        speed = speeds[codec]
        met = speed["vs_fp32_bytes"] <= TARGET_BYTES_SHARE and gap <= TARGET_LOSS_GAP_PCT
        rows.append({**speed, "updates": "/".join(map(str, updates)), "seeds": len(seeds),
                     "final_mean": round(mean, 5), "final_sd": round(sd, 5), "gap_vs_fp32_pct": round(gap, 2),
                     "target_met": met})
        print(f"{codec:<6} {speed['bytes_per_param']:>8.4f} {speed['update_mb']:>9.3f} "
              f"{speed['vs_fp32_bytes']:>8.4f} {speed['encode_mb_s']:>9.1f} {speed['decode_mb_s']:>9.1f} "
              f"{speed['feedback_encode_mb_s']:>8.1f} {rows[-1]['updates']:>7} {mean:>9.4f} ± {sd:.3f} "
              f"{gap:>7.2f}% {'met' if met else 'missed':>7}")
    print(f"target: ≤ {TARGET_BYTES_SHARE:.3f} of fp32's bytes and eval loss ≤ {TARGET_LOSS_GAP_PCT}% above "
          "fp32's")
    return rows


if __name__ == "__main__":
    main()
