"""Do volunteers help? The fastest worker alone against four workers at speeds 1, 1/2, 1/4, 1/8.

Both get the same virtual wall-clock time T (in steps of the fastest worker): alone it runs T
local steps under Delayed Nesterov with N = 1; together, DN + Dynamic Local Updates, the four run
T x (1 + 1/2 + 1/4 + 1/8) local steps. The ratio is the time the four need to reach the loss the
fastest reaches alone at T, divided by T: below 1, the volunteers help.

Three starts, each with four outer settings for the four (the paper's DN with ε = 0.5, β = 0.8;
the same with ε = 0.7 and the staleness discount (1 + staleness)^-0.5; eager DN with compute
weights (H_i/H)^1, ε = 0.5, β = 0.8; and that with a grace period of a quarter round, the
coordinator's defaults since benchmarks/parity.py):

* scratch: a fresh model;
* pretrained: both start from a model trained by one worker for ``--pretrain-steps`` (as the
  paper starts Local-SGD from a pretrained model);
* warm-start feature: from scratch, with the coordinator's ``--warm-start-steps K``: the fastest
  worker trains alone for K steps, then all four join; alone gets the same K + T time.

Everything runs the project's own round, codec and outer-optimizer code (coordinator.sim.simulator).

    python benchmarks/volunteers.py            # ~25 min on 2 cores
    python benchmarks/volunteers.py --seed 1
    python benchmarks/volunteers.py --starts scratch --settings "dn ε0.5,edn w1"   # one start
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from paper_table import run_jobs
from table_csv import write_rows

from coordinator.outer_optimizer import OuterConfig
from coordinator.sim.report import plot_png, write_csv
from coordinator.sim.simulator import SimConfig, speed_profile

# label -> (strategy, outer lr ε, staleness exponent a, compute exponent p, grace rounds, follow:
# rounds move onto θ while they train, the client's --follow; overlap: the client's --overlap, the
# next round starts while the delta is on its way and moves onto θ when it lands, with no grace;
# weight cap: OuterConfig.weight_cap, 0 = off)
SETTINGS = {
    "dn ε0.5": ("dn+dylu", 0.5, 0.0, 0.0, 0.0, False, "off", 0.0),
    "dn ε0.7 a0.5": ("dn+dylu", 0.7, 0.5, 0.0, 0.0, False, "off", 0.0),
    "edn w1": ("edn+dylu", 0.5, 0.0, 1.0, 0.0, False, "off", 0.0),
    "edn w1 g.25": ("edn+dylu", 0.5, 0.0, 1.0, 0.25, False, "off", 0.0),
    "edn w2 g.25": ("edn+dylu", 0.5, 0.0, 2.0, 0.25, False, "off", 0.0),
    "edn w1 g.25 ε0.7": ("edn+dylu", 0.7, 0.0, 1.0, 0.25, False, "off", 0.0),
    "edn w1 follow": ("edn+dylu", 0.5, 0.0, 1.0, 0.0, True, "off", 0.0),
    "edn w1 g.25 follow": ("edn+dylu", 0.5, 0.0, 1.0, 0.25, True, "off", 0.0),
    # what a user gets: the coordinator's defaults and the client's (--overlap --follow)
    "edn w1 g.25 overlap follow": ("edn+dylu", 0.5, 0.0, 1.0, 0.25, True, "rebase", 0.0),
    # that with the weight cap (--weight-cap 0.5): what holding the fastest to a third costs
    "defaults cap.5": ("edn+dylu", 0.5, 0.0, 1.0, 0.25, True, "rebase", 0.5),
    "defaults cap1": ("edn+dylu", 0.5, 0.0, 1.0, 0.25, True, "rebase", 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=480, help="virtual time T (steps of the fastest)")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--warm-start-steps", type=int, default=400, help="K of the coordinator feature")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--starts", default="scratch,pretrained,warm-start feature")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of the settings above")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("results/volunteers"))
    args = parser.parse_args()
    task = {"model_size": "tiny"}
    speeds = tuple(speed_profile("very", 4))  # 1, 1/2, 1/4, 1/8
    base = SimConfig(local_steps=args.local_steps, min_local_steps=min(5, args.local_steps),  # DyLU floor
                     eval_every_steps=40, outer=OuterConfig(lr=0.5, momentum=0.8, compute_exponent=0.0),
                     grace_rounds=0.0, seed=args.seed)
    together_steps = int(args.time * sum(speeds))
    k = args.warm_start_steps
    starts = {  # start -> (pretraining steps, warm-start steps, alone's time)
        "scratch": (0, 0, args.time),
        "pretrained": (args.pretrain_steps, 0, args.time),
        "warm-start feature": (0, k, k + args.time),
    }
    chosen = [x.strip() for x in args.starts.split(",") if x.strip()]
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if not chosen or set(chosen) - set(starts) or not settings or set(settings) - set(SETTINGS):
        parser.error(f"--starts takes {', '.join(starts)}; --settings takes {', '.join(SETTINGS)}")
    starts = {name: starts[name] for name in chosen}
    jobs = []
    for start, (pretrain, warm, alone_time) in starts.items():
        alone = replace(base, strategy="dn", speeds=(1.0,), budget_steps=alone_time, eval_every_steps=20)
        jobs.append((f"{start}/alone", alone, task, pretrain))
        for label in settings:
            strategy, lr, a, p, grace, follow, overlap, cap = SETTINGS[label]
            together = replace(base, strategy=strategy, speeds=speeds, warm_start_steps=warm,
                               grace_rounds=grace, follow=follow, overlap=overlap,
                               budget_steps=warm + together_steps,
                               outer=OuterConfig(lr=lr, momentum=0.8, staleness_exponent=a,
                                                 compute_exponent=p, weight_cap=cap))
            jobs.append((f"{start}/together {label}", together, task, pretrain))

    started = time.perf_counter()
    results = run_jobs(jobs, args.jobs)

    print()
    print(f"volunteers help? speeds 1, 1/2, 1/4, 1/8 (DyLU, H={args.local_steps}) against the fastest "
          f"alone; T={args.time}, seed {args.seed}")
    print(f"{'start':<19} {'four together':<27} {'alone final':>11} {'together final':>14} "
          f"{'ratio':>6}")
    rows = []
    for start in starts:
        alone = results[f"{start}/alone"]
        target, t_alone = alone.final_loss, alone.curve[-1].virtual_time
        for label in settings:
            together = results[f"{start}/together {label}"]
            reach = together.time_to_reach(target)
            ratio = None if reach is None else reach / t_alone
            rows.append({"start": start, "together": label, "alone_final": round(target, 5),
                         "together_final": round(together.final_loss, 5),
                         "time_alone": round(t_alone, 1),
                         "time_together_to_alone_loss": None if reach is None else round(reach, 1),
                         "ratio": None if ratio is None else round(ratio, 3)})
            shown = "never" if ratio is None else f"{ratio:.3f}"
            print(f"{start:<19} {label:<27} {target:>11.4f} {together.final_loss:>14.4f} {shown:>6}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(args.out / "volunteers.csv", rows)
    write_csv(args.out / "curves.csv", results)
    shown = chosen[-1]
    plot_png(args.out / f"{shown}.png", {k: v for k, v in results.items() if k.startswith(f"{shown}/")},
             title=f"volunteers vs the fastest alone, {shown} (seed {args.seed})")
    print(f"ratio below 1: the four reach the fastest worker's final loss sooner. "
          f"{time.perf_counter() - started:.0f} s; wrote {args.out}/volunteers.csv, curves.csv, "
          f"{shown}.png")


if __name__ == "__main__":
    main()
