"""Outer-optimizer settings on a virtual clock: which ε, β keep async training stable?

Runs W workers of given speeds in one process on a discrete-event virtual clock (one time unit =
one local step of the fastest worker), with the project's own code: ``shared.local_round``
(LocalTrainer, the client's round) and ``coordinator.outer_optimizer`` (Delayed Nesterov). Each
worker starts a round from the current global parameters, runs H_i = DyLU steps, and its delta is
applied when the round ends in virtual time, so staleness is real. Prints a table and writes a CSV.

    python benchmarks/outer_sweep.py --settings 0.7:0.9,0.5:0.8 --speeds 1,0.5,0.25 --until 1200
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import time
from pathlib import Path

import torch

from coordinator.outer_optimizer import DelayedNesterov, OuterConfig
from shared.local_round import InnerConfig, LocalTrainer
from shared.tasks import load_task


def run(*, lr: float, momentum: float, speeds: list[float], local_steps: int, until: float,
        eval_every: float, seed: int, task_settings: dict) -> list[tuple[float, int, float]]:
    """One training run; returns [(virtual time, total local steps, eval loss)]."""
    task = load_task("bytelm", task_settings)
    torch.manual_seed(seed)
    model = task.build_model()
    outer = DelayedNesterov(dict(model.named_parameters()), OuterConfig(lr=lr, momentum=momentum))
    fastest = max(speeds)
    steps_of = [max(1, math.floor(s / fastest * local_steps)) for s in speeds]  # DyLU
    trainers = [LocalTrainer(task=task, inner=InnerConfig(), device=torch.device("cpu"), shard=i,
                             seed=seed + i) for i in range(len(speeds))]
    events: list[tuple[float, int]] = []
    total_steps = 0

    def start(worker: int, now: float) -> None:
        trainers[worker].load_base(outer.params)
        trainers[worker].train(steps_of[worker], global_step=total_steps)
        heapq.heappush(events, (now + steps_of[worker] / speeds[worker], worker))

    def evaluate() -> float:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(outer.params[name])
        return task.evaluate(model)

    for worker in range(len(speeds)):
        start(worker, 0.0)
    curve = [(0.0, 0, evaluate())]
    next_eval = eval_every
    while events:
        now, worker = heapq.heappop(events)
        if now > until:
            break
        outer.step(trainers[worker].pseudo_gradient(), active_clients=len(speeds))
        total_steps += steps_of[worker]
        if now >= next_eval:
            curve.append((now, total_steps, evaluate()))
            next_eval += eval_every
        start(worker, now)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.7:0.9,0.5:0.8", help="comma list of LR:MOMENTUM")
    parser.add_argument("--speeds", default="1,0.5,0.25", help="relative worker speeds")
    parser.add_argument("--local-steps", type=int, default=30, help="H of the fastest worker")
    parser.add_argument("--until", type=float, default=1200, help="virtual time (fastest worker's steps)")
    parser.add_argument("--eval-every", type=float, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/outer_sweep.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    speeds = [float(s) for s in args.speeds.split(",")]
    settings = [tuple(float(x) for x in item.split(":")) for item in args.settings.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for lr, momentum in settings:
        started = time.perf_counter()
        curve = run(lr=lr, momentum=momentum, speeds=speeds, local_steps=args.local_steps,
                    until=args.until, eval_every=args.eval_every, seed=args.seed,
                    task_settings={"model_size": "tiny"})
        rows += [(lr, momentum, t, steps, loss) for t, steps, loss in curve]
        losses = [loss for *_, loss in curve]
        print(f"ε={lr:<4} β={momentum:<4} eval: " + " ".join(f"{x:.3f}" for x in losses)
              + f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["outer_lr", "outer_momentum", "virtual_time", "local_steps", "eval_loss"])
        writer.writerows(rows)
    print(f"speeds {speeds}, H={args.local_steps}, seed {args.seed}; wrote {args.out}")


if __name__ == "__main__":
    main()
