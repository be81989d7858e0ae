"""Reproduce the shape of Table 1 of Liu et al. (2024) on the tiny model, on a virtual clock.

For each heterogeneity level (none / slight / moderate / very: slowest worker at 1, 1/1.5, 1/3,
1/8 of the fastest), 4 workers run sync DiLoCo, async Nesterov, async DN and async DN+DyLU for the
same total number of local steps. The table gives each final eval loss, its gap to sync, and the
virtual wall-clock time each needs to reach sync's final loss. Whether volunteers help (the
fastest worker alone against all four) is benchmarks/volunteers.py. Everything runs the project's
own round, codec and outer-optimizer code (coordinator.sim.simulator).

    python benchmarks/paper_table.py                 # default: ~15 min on 2 cores
    python benchmarks/paper_table.py --budget 2400   # closer to convergence, longer
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from table_csv import write_rows

from coordinator.outer_optimizer import OuterConfig
from coordinator.sim.report import plot_png, write_csv
from coordinator.sim.simulator import SimConfig, SimResult, Simulation, speed_profile
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


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """``--seeds`` of the simulator benchmarks: a comma list of at least one integer (else the
    parser's one-line error)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error("--seeds takes a comma list of integers")
    if not seeds:
        parser.error("--seeds names no seed")
    return seeds


def run_jobs(jobs: list[tuple[str, SimConfig, dict, int]], processes: int, *,
             on_done: Callable[[SimResult], None] | None = None) -> dict[str, SimResult]:
    """Run the simulator ``jobs`` (each as :func:`run_job` takes it) in ``processes`` worker
    processes; their results by label, each said as it is done (and handed to ``on_done``)."""
    width = max((len(job[0]) for job in jobs), default=0)
    results: dict[str, SimResult] = {}
    with ProcessPoolExecutor(max_workers=processes) as pool:
        for label, result, seconds in pool.map(run_job, jobs):
            results[label] = result
            if on_done is not None:
                on_done(result)
            print(f"  done {label:<{width}} final {result.final_loss:.4f}  ({seconds:.0f} s)", flush=True)
    return results


def run_job(args: tuple[str, SimConfig, dict, int]) -> tuple[str, SimResult, float]:
    """(label, config, task settings, pretraining steps) → (label, result, seconds); for a pool."""
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
    parser.add_argument("--levels", default=",".join(LEVELS),
                        help="comma list of heterogeneity levels to run (default: all four)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("results/paper_table"))
    args = parser.parse_args()
    chosen = {lv.strip() for lv in args.levels.split(",") if lv.strip()}
    if not chosen or chosen - set(LEVELS):
        parser.error(f"--levels takes a comma list of {', '.join(LEVELS)}")
    args.levels = [lv for lv in LEVELS if lv in chosen]  # least to most heterogeneous
    task_settings = {"model_size": "tiny"}
    base = SimConfig(local_steps=args.local_steps, min_local_steps=max(1, args.local_steps // 10),
                     budget_steps=args.budget, eval_every_steps=max(40, args.budget // 8),
                     outer=OuterConfig(strategy="dn", lr=args.outer_lr, momentum=args.outer_momentum,
                                       compute_exponent=0.0),
                     grace_rounds=0.0, seed=args.seed)  # the paper's methods, as published
    jobs = [(f"{level}/{s}", replace(base, strategy=s, speeds=tuple(speed_profile(level, 4))),
             task_settings, 0) for level in args.levels for s in STRATEGIES]

    started = time.perf_counter()
    results = run_jobs(jobs, args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(args.out / "paper_table.csv", _table(results, args))
    write_csv(args.out / "curves.csv", results)
    shown = args.levels[-1]  # the most heterogeneous level that ran
    plot_png(args.out / f"{shown}.png",
             {k.split("/")[1]: v for k, v in results.items() if k.startswith(f"{shown}/")},
             title=f"{shown} heterogeneity, 4 workers, H={args.local_steps}, {args.budget} local steps")
    print(f"seed {args.seed}; {time.perf_counter() - started:.0f} s; wrote {args.out}/paper_table.csv, "
          f"curves.csv, {shown}.png")


def _table(results: dict[str, SimResult], args: argparse.Namespace) -> list[dict]:
    print()
    print(f"4 workers, H={args.local_steps}, {args.budget} total local steps, outer ε={args.outer_lr} "
          f"β={args.outer_momentum}, seed {args.seed}")
    print(f"{'level':<9} {'strategy':<9} {'final eval':>10} {'vs sync':>8} {'virtual time':>12} "
          f"{'time to sync loss':>17} {'vs sync time':>12}")
    rows = []
    for level in args.levels:
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


if __name__ == "__main__":
    main()
