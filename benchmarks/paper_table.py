"""Reproduce the shape of Table 1 of Liu et al. (2024) on the tiny model, on a virtual clock.

For each heterogeneity level (none / slight / moderate / very: slowest worker at 1, 1/1.5, 1/3,
1/8 of the fastest), 4 workers run sync DiLoCo, async Nesterov, async DN and async DN+DyLU for the
same total number of local steps. The table gives each final eval loss, its gap to sync, and the
virtual wall-clock time each needs to reach sync's final loss. A second table asks whether
volunteers help: 4 workers at speeds 1, 1/2, 1/4, 1/8 under DN+DyLU against the fastest worker
alone, from scratch and from a warm start (ordinary single-worker training first, as the paper).
Everything runs the project's own round, codec and outer-optimizer code (coordinator.simulator).

    python benchmarks/paper_table.py                 # default: ~15 min on 2 cores
    python benchmarks/paper_table.py --budget 2400   # closer to convergence, longer
"""

from __future__ import annotations

import argparse
import csv
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from coordinator.outer_optimizer import OuterConfig
from coordinator.sim_report import plot_png, write_csv
from coordinator.simulator import SimConfig, SimResult, Simulation, speed_profile
from shared.tasks import load_task

LEVELS = ("none", "slight", "moderate", "very")
STRATEGIES = ("sync", "nesterov", "dn", "dn+dylu")
_SIM: Simulation | None = None


def _simulation(task_settings: dict) -> Simulation:
    global _SIM
    if _SIM is None:  # one corpus per worker process
        torch.set_num_threads(1)
        _SIM = Simulation(load_task("bytelm", task_settings))
    return _SIM


def _job(args: tuple[str, SimConfig, dict, int]) -> tuple[str, SimResult, float]:
    label, config, task_settings, warm_steps = args
    sim = _simulation(task_settings)
    started = time.perf_counter()
    init = sim.pretrain(warm_steps, seed=config.seed) if warm_steps else None
    return label, sim.run(config, init=init), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=480, help="total local steps per run")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--outer-lr", type=float, default=0.5)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--warm-steps", type=int, default=200, help="warm start length (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("results/paper_table"))
    args = parser.parse_args()
    task_settings = {"model_size": "tiny"}
    base = SimConfig(local_steps=args.local_steps, min_local_steps=max(1, args.local_steps // 10),
                     budget_steps=args.budget, eval_every_steps=max(40, args.budget // 8),
                     outer=OuterConfig(lr=args.outer_lr, momentum=args.outer_momentum), seed=args.seed)
    jobs = [(f"{level}/{s}", replace(base, strategy=s, speeds=tuple(speed_profile(level, 4))),
             task_settings, 0) for level in LEVELS for s in STRATEGIES]
    volunteers = tuple(speed_profile("very", 4))  # 1, 1/2, 1/4, 1/8
    alone_budget = args.budget // 2
    # same virtual time for both: the four together do sum(speeds) x the steps of the fastest alone
    together = replace(base, strategy="dn+dylu", speeds=volunteers,
                       budget_steps=int(alone_budget * sum(volunteers)))
    alone = replace(base, strategy="dn", speeds=(1.0,), budget_steps=alone_budget)
    for start, warm in (("scratch", 0), ("warm", args.warm_steps)):
        if start == "warm" and not warm:
            continue
        jobs += [(f"{start}/alone", alone, task_settings, warm),
                 (f"{start}/together", together, task_settings, warm)]

    started = time.perf_counter()
    results: dict[str, SimResult] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for label, result, seconds in pool.map(_job, jobs):
            results[label] = result
            print(f"  done {label:<22} final {result.final_loss:.4f}  ({seconds:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = _table(results, args)
    with (args.out / "paper_table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_csv(args.out / "curves.csv", results)
    plot_png(args.out / "very.png",
             {k.split("/")[1]: v for k, v in results.items() if k.startswith("very/")},
             title=f"very heterogeneous, 4 workers, H={args.local_steps}, {args.budget} local steps")
    _volunteer_table(results)
    print(f"seed {args.seed}; {time.perf_counter() - started:.0f} s; wrote {args.out}/paper_table.csv, "
          f"curves.csv, very.png")


def _table(results: dict[str, SimResult], args: argparse.Namespace) -> list[dict]:
    print()
    print(f"4 workers, H={args.local_steps}, {args.budget} total local steps, outer ε={args.outer_lr} "
          f"β={args.outer_momentum}, seed {args.seed}")
    print(f"{'level':<9} {'strategy':<9} {'final eval':>10} {'vs sync':>8} {'virtual time':>12} "
          f"{'time to sync loss':>17} {'vs sync time':>12}")
    rows = []
    for level in LEVELS:
        sync = results[f"{level}/sync"]
        target = sync.final_loss
        sync_time = sync.time_to_reach(target)
        for strategy in STRATEGIES:
            r = results[f"{level}/{strategy}"]
            reach = r.time_to_reach(target)
            ratio = reach / sync_time if reach is not None and sync_time else None
            rows.append({"level": level, "strategy": strategy, "final_eval": round(r.final_loss, 5),
                         "gap_vs_sync_pct": round(100 * (r.final_loss / target - 1), 2),
                         "virtual_time": round(r.curve[-1].virtual_time, 1),
                         "time_to_sync_loss": None if reach is None else round(reach, 1),
                         "time_ratio_vs_sync": None if ratio is None else round(ratio, 3)})
            reach_s = "never" if reach is None else f"{reach:.1f}"
            ratio_s = "-" if ratio is None else f"{ratio:.3f}"
            print(f"{level:<9} {strategy:<9} {r.final_loss:>10.4f} {rows[-1]['gap_vs_sync_pct']:>7.2f}% "
                  f"{r.curve[-1].virtual_time:>12.1f} {reach_s:>17} {ratio_s:>12}")
    return rows


def _volunteer_table(results: dict[str, SimResult]) -> None:
    print()
    print("volunteers help? DN+DyLU with speeds 1, 1/2, 1/4, 1/8 vs the fastest worker alone")
    for start in ("scratch", "warm"):
        if f"{start}/alone" not in results:
            continue
        alone, together = results[f"{start}/alone"], results[f"{start}/together"]
        target = alone.final_loss
        t_alone = alone.curve[-1].virtual_time
        t_together = together.time_to_reach(target)
        when = "never" if t_together is None else f"at t={t_together:.0f}"
        ratio = "n/a" if t_together is None else f"{t_together / t_alone:.3f}"
        print(f"  {start:<8} alone reaches {target:.4f} at t={t_alone:.0f}; together {when}; "
              f"ratio {ratio} (below 1: volunteers help); together final {together.final_loss:.4f}")


if __name__ == "__main__":
    main()
