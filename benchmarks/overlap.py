"""Rounds that overlap the wait for a delta's snapshot (the client's ``--overlap``): what they cost
per update and what they buy on the wall clock, on a virtual clock.

4 workers (coordinator.sim.simulator: the project's own round, codec, outer optimizer and guard)
whose deltas take ``--latency`` rounds to land in a snapshot (upload and commit). Modes:

  off      a worker waits for its delta's snapshot (and the cycle's grace), then starts from θ
  stack    it starts at once, from θ moved by its own in-flight delta (as the coordinator will)
  rebase   as stack, and when the snapshot that holds its delta lands mid-round, the round's
           progress so far moves onto it (LocalTrainer.rebase) and the round goes on from there
  +follow  (off+follow, rebase+follow) a round moves onto θ, its progress carried, each time θ
           changes while it trains, not only when its own last delta lands

Each overlapping run gets more local steps than ``off`` so that it reaches off's wall time. The
table gives, as mean ± sd over the seeds: the eval loss at off's budget of local steps (per
update: equal compute), the eval loss at off's final virtual time (equal wall time), and the time
each needed to reach off's final loss, as a share of off's time (linear between evals); and how
many of the (honest) deltas the coordinator's guard refused, of those it judged.

    python benchmarks/overlap.py                           # none and very, 3 seeds: ~17 min on 2 cores
    python benchmarks/overlap.py --latency 0.1 --seeds 0   # a shorter wait, one seed
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from paper_table import LEVELS, parse_seeds, run_jobs
from table_csv import write_rows

from coordinator.sim.simulator import OVERLAP, SimConfig, SimResult, speed_profile

MODES = (*OVERLAP, "off+follow", "rebase+follow")

EXTRA_BUDGET = 1.5  # an overlapping run's local steps against off's, enough to pass off's time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=480, help="off's total local steps")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--latency", type=float, default=0.25,
                        help="upload + commit, in rounds of the fastest worker (H steps)")
    parser.add_argument("--jitter", type=float, default=0.1, help="round-to-round speed noise (sigma)")
    parser.add_argument("--codec", default="int3")
    parser.add_argument("--levels", default="none,very")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("results/overlap"))
    args = parser.parse_args()
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not levels or set(levels) - set(LEVELS):
        parser.error(f"--levels takes a comma list of {', '.join(LEVELS)}")
    if "off" not in modes or set(modes) - set(MODES):
        parser.error(f"--modes takes a comma list of {', '.join(MODES)}, off included")
    if not 0 < args.latency <= 4:
        parser.error("--latency must be in (0, 4] rounds")
    seeds = parse_seeds(parser, args.seeds)
    task_settings = {"model_size": "tiny"}
    base = SimConfig(local_steps=args.local_steps, budget_steps=args.budget, jitter=args.jitter,
                     eval_every_steps=max(20, args.budget // 12), codec=args.codec,
                     latency=args.latency * args.local_steps)
    jobs = []
    for level in levels:
        for mode in modes:
            overlap, _, follow = mode.partition("+")
            budget = args.budget if overlap == "off" else int(args.budget * EXTRA_BUDGET)
            for seed in seeds:
                config = replace(base, speeds=tuple(speed_profile(level, 4)), overlap=overlap, seed=seed,
                                 budget_steps=budget, follow=bool(follow))
                jobs.append((f"{level}/{mode}/{seed}", config, task_settings, 0))

    started = time.perf_counter()
    results = run_jobs(jobs, args.jobs)
    rows = _table(results, levels, modes, seeds, args)
    write_rows(args.out / "overlap.csv", rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/overlap.csv")


def _at(result: SimResult, x: float, attr: str) -> float | None:
    """Eval loss where the curve's ``attr`` (local_steps or virtual_time) is ``x`` (linear between
    evals); None past its end."""
    for prev, point in zip(result.curve, result.curve[1:], strict=False):
        lo, hi = getattr(prev, attr), getattr(point, attr)
        if hi >= x:
            frac = 1.0 if hi == lo else (x - lo) / (hi - lo)
            return prev.eval_loss + frac * (point.eval_loss - prev.eval_loss)
    return None


def _mean_sd(values: list[float | None]) -> tuple[float | None, float]:
    if None in values or not values:
        return None, 0.0
    known = [v for v in values if v is not None]
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0


def _table(results: dict[str, SimResult], levels: list[str], modes: list[str], seeds: list[int],
           args: argparse.Namespace) -> list[dict]:
    print()
    print(f"4 workers, H={args.local_steps}, off: {args.budget} local steps, latency {args.latency} "
          f"rounds, {args.codec} deltas, jitter {args.jitter}, seeds {seeds}")
    print(f"{'level':<6} {'mode':<13} {'eval, equal steps':>18} {'eval, equal time':>18} "
          f"{'to off loss':>11} {'staleness':>9} {'refused':>9}")
    rows = []
    for level in levels:
        off = [results[f"{level}/off/{s}"] for s in seeds]
        for mode in modes:
            runs = [results[f"{level}/{mode}/{s}"] for s in seeds]
            steps_loss = _mean_sd([_at(r, args.budget, "local_steps") for r in runs])
            pairs = list(zip(runs, off, strict=True))
            time_loss = _mean_sd([_at(r, o.curve[-1].virtual_time, "virtual_time") for r, o in pairs])
            reach = [(r.time_to_reach(o.final_loss), o.curve[-1].virtual_time) for r, o in pairs]
            shares = [None if t is None else t / end for t, end in reach]
            share = _mean_sd(shares)[0]
            stale = max(r.max_staleness for r in runs)
            judged = sum(r.guard_counts.get("honest_judged", 0) for r in runs)
            refused = sum(r.guard_counts.get("honest_refused", 0) for r in runs)
            rows.append({"level": level, "mode": mode, "latency_rounds": args.latency, "seeds": len(seeds),
                         "eval_equal_steps": _round(steps_loss[0]),
                         "eval_equal_steps_sd": _round(steps_loss[1]),
                         "eval_equal_time": _round(time_loss[0]), "eval_equal_time_sd": _round(time_loss[1]),
                         "time_to_off_loss_share": None if share is None else round(share, 3),
                         "max_staleness": stale, "honest_judged": judged, "honest_refused": refused})
            print(f"{level:<6} {mode:<13} {_shown(steps_loss):>18} {_shown(time_loss):>18} "
                  f"{'never' if share is None else f'{share:.3f}':>11} {stale:>9} {refused:>4}/{judged:<4}")
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _shown(mean_sd: tuple[float | None, float]) -> str:
    mean, sd = mean_sd
    return "—" if mean is None else f"{mean:.4f} ± {sd:.3f}"


if __name__ == "__main__":
    main()
