"""Per-update parity with synchronous DiLoCo, over seeds: which asynchronous variant comes closest.

4 workers on a virtual clock (coordinator.sim.simulator: the project's own round, codec and outer
optimizer), each variant run for the same total local steps as sync (equal compute), from scratch
or from a pretrained start, for several seeds. The table gives each variant's final eval loss as
mean ± sd over the seeds and its gap to sync's mean (per update), and the virtual time it needed
to reach sync's final loss as a share of sync's time (on the wall clock; "never" if a seed did not
reach it within its budget); the CSV has every run.

Variants (all with DyLU, the round sized to the worker's speed, and the chosen ε, β):
  dn          Delayed Nesterov (Algorithm 3 of Liu et al., 2024, c = 0)
  edn         eager Delayed Nesterov: the cycle's momentum step at its first arrival
  edn+w1      edn with compute weights (H_i/H)^1: a short round counts for its share of a round
  edn+w.5     edn with compute weights (H_i/H)^0.5
  dn+g.25     dn with a grace period: a worker whose delta did not end the buffer's cycle waits up
              to a quarter of a round for it to end, then starts from θ with its momentum step
  edn+g.25    the same for edn
  dn+w1+g.25  dn with compute weights (p = 1) and the grace period
  edn+w1+g.25 edn with compute weights (p = 1) and the grace period
  edn+w1+follow       edn with compute weights; rounds move onto θ while they train (--follow)
  edn+w1+g.25+follow  the same with the grace period

    python benchmarks/parity.py                          # none and very, 3 seeds: ~25 min on 2 cores
    python benchmarks/parity.py --levels very --seeds 0  # one quick look
    python benchmarks/parity.py --pretrain 200 --local-steps 50 --cosine --budget 1200 \
        --levels none,slight,moderate,very --variants sync,edn+w1+g.25   # the paper's regime
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from paper_table import LEVELS, parse_seeds, run_jobs
from table_csv import write_rows

from coordinator.outer_optimizer import OuterConfig
from coordinator.sim.simulator import SimConfig, SimResult, speed_profile
from shared.local_round import InnerConfig

# label -> (simulator strategy, compute exponent, grace in rounds, follow)
VARIANTS: dict[str, tuple[str, float, float, bool]] = {
    "sync": ("sync", 0.0, 0.0, False),
    "dn": ("dn+dylu", 0.0, 0.0, False),
    "edn": ("edn+dylu", 0.0, 0.0, False),
    "edn+w1": ("edn+dylu", 1.0, 0.0, False),
    "edn+w.5": ("edn+dylu", 0.5, 0.0, False),
    "dn+g.25": ("dn+dylu", 0.0, 0.25, False),
    "edn+g.25": ("edn+dylu", 0.0, 0.25, False),
    "dn+w1+g.25": ("dn+dylu", 1.0, 0.25, False),
    "edn+w1+g.25": ("edn+dylu", 1.0, 0.25, False),
    "edn+w1+follow": ("edn+dylu", 1.0, 0.0, True),
    "edn+w1+g.25+follow": ("edn+dylu", 1.0, 0.25, True),
}
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=480, help="total local steps per run")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--outer-lr", type=float, default=0.5)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--jitter", type=float, default=0.1, help="round-to-round speed noise (sigma)")
    parser.add_argument("--pretrain", type=int, default=0, help="single-worker steps before (0: scratch)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cosine", action="store_true",
                        help="anneal the inner lr by a cosine to the budget (--schedule-steps = --budget)")
    parser.add_argument("--levels", default="none,very")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("results/parity"))
    args = parser.parse_args()
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not levels or set(levels) - set(LEVELS):
        parser.error(f"--levels takes a comma list of {', '.join(LEVELS)}")
    if "sync" not in variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants takes a comma list of {', '.join(VARIANTS)}, sync included")
    seeds = parse_seeds(parser, args.seeds)
    if args.workers < 2:
        parser.error("--workers must be >= 2")
    task_settings = {"model_size": "tiny"}
    base = SimConfig(local_steps=args.local_steps, min_local_steps=5, budget_steps=args.budget,
                     eval_every_steps=max(40, args.budget // 8), jitter=args.jitter,
                     outer=OuterConfig(lr=args.outer_lr, momentum=args.outer_momentum),
                     inner=InnerConfig(schedule_steps=args.budget if args.cosine else 0))
    jobs = []
    for level in levels:
        speeds = tuple(speed_profile(level, args.workers))
        for variant in variants:
            strategy, p, grace, follow = VARIANTS[variant]
            for seed in seeds:
                config = replace(base, strategy=strategy, speeds=speeds, seed=seed, grace_rounds=grace,
                                 follow=follow, outer=replace(base.outer, compute_exponent=p))
                jobs.append((f"{level}/{variant}/{seed}", config, task_settings, args.pretrain))

    started = time.perf_counter()
    results = run_jobs(jobs, args.jobs)
    runs = []
    for label, r in results.items():
        level, variant, seed = label.split("/")
        runs.append({"level": level, "variant": variant, "seed": seed, "final_eval": round(r.final_loss, 5),
                     "virtual_time": round(r.curve[-1].virtual_time, 1), "updates": r.curve[-1].updates,
                     "max_staleness": r.max_staleness, "discarded_stale": r.discarded_stale})
    write_rows(args.out / "runs.csv", runs)
    write_rows(args.out / "parity.csv", _table(results, levels, variants, seeds, args))
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/parity.csv and runs.csv")


def _table(results: dict[str, SimResult], levels: list[str], variants: list[str], seeds: list[int],
           args: argparse.Namespace) -> list[dict]:
    start = f"pretrained {args.pretrain} steps" if args.pretrain else "from scratch"
    print()
    schedule = ", cosine to the budget" if args.cosine else ""
    print(f"{args.workers} workers, H={args.local_steps}, {args.budget} total local steps (equal compute)"
          f"{schedule}, {start}, "
          f"ε={args.outer_lr} β={args.outer_momentum}, jitter {args.jitter}, seeds {seeds}")
    print(f"{'level':<9} {'variant':<18} {'final eval':>16} {'vs sync':>8} {'virtual time':>12} "
          f"{'to sync loss':>12}")
    rows = []
    for level in levels:
        sync_mean = statistics.fmean(results[f"{level}/sync/{s}"].final_loss for s in seeds)
        sync_time = statistics.fmean(results[f"{level}/sync/{s}"].curve[-1].virtual_time for s in seeds)
        for variant in variants:
            finals = [results[f"{level}/{variant}/{s}"].final_loss for s in seeds]
            mean = statistics.fmean(finals)
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            vtime = statistics.fmean(results[f"{level}/{variant}/{s}"].curve[-1].virtual_time for s in seeds)
            gap = 100 * (mean / sync_mean - 1)
            reach = [results[f"{level}/{variant}/{s}"].time_to_reach(sync_mean) for s in seeds]
            share = None if None in reach else statistics.fmean(r for r in reach if r is not None) / sync_time
            if variant == "sync":
                share = 1.0  # the reference itself (a seed ending above the seeds' mean never reaches it)
            rows.append({"level": level, "variant": variant, "start": start, "workers": args.workers,
                         "cosine": args.cosine, "local_steps": args.local_steps, "seeds": len(seeds),
                         "final_mean": round(mean, 5), "final_sd": round(sd, 5),
                         "gap_vs_sync_pct": round(gap, 2), "virtual_time": round(vtime, 1),
                         "time_to_sync_loss_share": None if share is None else round(share, 3)})
            shown = "never" if share is None else f"{share:.3f}"
            print(f"{level:<9} {variant:<18} {mean:>9.4f} ± {sd:.3f} {gap:>7.2f}% {vtime:>12.1f} {shown:>12}")
    return rows


if __name__ == "__main__":
    main()
