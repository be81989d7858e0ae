"""Poisoned updates: how much damage lying volunteers do, with the guard on and off.

Workers on a virtual clock (coordinator.sim.simulator: the project's own round, codec, outer
optimizer and delta guard); the attackers (coordinator.sim.attacks) are the fastest workers, who
send most often: the worst case. Each attacked run is compared with the clean run of the same
setting (strategy, heterogeneity, guard, seed) at equal total local steps:

    damage = (attacked final loss − clean final loss) / (initial loss − clean final loss)

the share of the clean run's improvement the attack took away (0: none; 1: back to the start;
above 1: worse than the start). The guard's own cost is the clean run with the guard on against
the clean run with it off, in the same units. "honest hit" is the share of honest deltas the
guard refused or clipped (over all its runs); "attack stopped" the share of forged deltas it
refused or clipped. For the backdoor, "trigger" is the final loss of the payload after the
trigger (lower = learnt), against the clean run's; it moves with the run's own course, so "learnt"
is the control payload's loss minus the payload's (0: nothing learnt), against the clean run's.

    python benchmarks/attacks.py      # edn and sync, none and very, 3 seeds: ~70 min on 2 cores
    python benchmarks/attacks.py --seeds 0 --levels very --strategies edn   # one quick look
    python benchmarks/attacks.py --workers 16 --attackers 3 --budget 1920   # 3 of 16
    python benchmarks/attacks.py --weight-cap 0.5 --out results/attacks-cap  # with the weight cap

Each run's outcome is kept in OUT/cache/ under a hash of its whole setting and of SIM_VERSION, so a
rerun with more attacks, strategies or seeds (or ``--guards on`` after ``--guards off``) runs only
what is new. Raise SIM_VERSION (or delete OUT/cache) after changing what the guard or the
simulator does.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from paper_table import LEVELS, parse_seeds, run_jobs
from table_csv import write_rows

from coordinator.guard import GuardConfig
from coordinator.outer_optimizer import OuterConfig
from coordinator.sim.attacks import AttackConfig
from coordinator.sim.simulator import SimConfig, SimPoint, SimResult, speed_profile

# label -> (kind, strength)
ATTACK_SET: dict[str, tuple[str, float]] = {
    "clean": ("", 0.0),
    "scale x10": ("scale", 10.0),
    "scale x100": ("scale", 100.0),
    "scale max": ("scale_max", 1.0),
    "signflip x1": ("signflip", 1.0),
    "signflip x10": ("signflip", 10.0),
    "noise x3": ("noise", 3.0),
    "alie z1": ("alie", 1.0),
    "ipm x0.5": ("ipm", 0.5),
    "backdoor x4": ("backdoor", 4.0),
    "base lie": ("base_lie", 1.0),
}
STRATEGIES = {"edn": "edn+dylu", "dn": "dn+dylu", "sync": "sync"}
SIM_VERSION = 5  # of the guard's and the simulator's behaviour: raise it when either changes (cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=480, help="total local steps per run")
    parser.add_argument("--local-steps", type=int, default=20, help="H")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--attackers", type=int, default=1, help="how many of the workers lie (the fastest)")
    parser.add_argument("--jitter", type=float, default=0.1, help="round-to-round speed noise (sigma)")
    parser.add_argument("--warm-start", type=int, default=40,
                        help="local steps a trusted holder trains first (0: none, the guard starts blind)")
    parser.add_argument("--levels", default="none,very")
    parser.add_argument("--strategies", default="edn,sync", help=f"comma list of {', '.join(STRATEGIES)}")
    parser.add_argument("--attacks", default=",".join(ATTACK_SET))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", type=Path, default=Path("results/attacks"))
    parser.add_argument("--plot", type=Path, default=None, help="also draw the damage figure here (PNG)")
    parser.add_argument("--clip-ratio", type=float, default=GuardConfig.clip_ratio,
                        help="the guard's --guard-clip-ratio in the guarded runs")
    parser.add_argument("--forgive-after", type=int, default=GuardConfig.forgive_after,
                        help="the guard's --guard-forgive-after in the guarded runs (0: never)")
    parser.add_argument("--direction-spread", type=float, default=GuardConfig.direction_spread,
                        help="the guard's --guard-direction-spread in the guarded runs (0: off)")
    parser.add_argument("--descent-every", type=int, default=GuardConfig.descent_every,
                        help="the guard's --guard-descent-every in the guarded runs (0: off)")
    parser.add_argument("--distrust", action=argparse.BooleanOptionalAction, default=GuardConfig.distrust,
                        help="the guard's --guard-distrust in the guarded runs (tried on the task's data)")
    parser.add_argument("--seed-round", action=argparse.BooleanOptionalAction, default=GuardConfig.seed_round,
                        help="the guard's --guard-seed-round in the guarded runs without a warm start")
    parser.add_argument("--weight-cap", type=float, default=OuterConfig.weight_cap,
                        help="the coordinator's --weight-cap in every run (0: off)")
    parser.add_argument("--replot", type=Path, default=None, metavar="CSV",
                        help="draw --plot from an attacks.csv this script wrote (give the same --budget)")
    parser.add_argument("--guards", default="off,on",
                        help="comma list of off, on: which runs to do (the table needs both, from the cache)")
    args = parser.parse_args()
    if args.replot is not None:
        if args.plot is None:
            parser.error("--replot needs --plot")
        _replot(args)
        return
    levels = _names(parser, args.levels, LEVELS, "--levels")
    strategies = _names(parser, args.strategies, STRATEGIES, "--strategies")
    attacks = _names(parser, args.attacks, ATTACK_SET, "--attacks")
    if "clean" not in attacks:
        parser.error("--attacks must include clean (the reference)")
    if not 0 < args.attackers < args.workers:
        parser.error("--attackers must be at least 1 and fewer than --workers")
    seeds = parse_seeds(parser, args.seeds)
    task_settings = {"model_size": "tiny"}
    base = SimConfig(local_steps=args.local_steps, min_local_steps=5, budget_steps=args.budget,
                     eval_every_steps=max(40, args.budget // 4), jitter=args.jitter,
                     warm_start_steps=args.warm_start, outer=OuterConfig(weight_cap=args.weight_cap),
                     measure_trigger=True)
    guards = {"off": GuardConfig(mode="off"),
              "on": GuardConfig(clip_ratio=args.clip_ratio, forgive_after=args.forgive_after,
                                direction_spread=args.direction_spread,
                                descent_every=args.descent_every, distrust=args.distrust,
                                seed_round=args.seed_round)}
    guards = {name: guards[name] for name in _names(parser, args.guards, guards, "--guards")}
    jobs = []
    for level in levels:
        speeds = tuple(speed_profile(level, args.workers))
        for strategy in strategies:
            for guard_name, guard in guards.items():
                for attack in attacks:
                    kind, strength = ATTACK_SET[attack]
                    attack_config = AttackConfig(kind=kind, attackers=args.attackers if kind else 0,
                                                 scale=strength or 1.0)
                    for seed in seeds:
                        config = replace(base, strategy=STRATEGIES[strategy], speeds=speeds, seed=seed,
                                         guard=guard, attack=attack_config)
                        jobs.append((f"{level}/{strategy}/{guard_name}/{attack}/{seed}", config,
                                     task_settings, 0))

    started = time.perf_counter()
    cache = args.out / "cache"
    results: dict[str, SimResult] = {}
    todo = []
    for job in jobs:
        kept = _load(cache, job[1])
        if kept is None:
            todo.append(job)
        else:
            results[job[0]] = kept
    print(f"{len(jobs)} runs: {len(jobs) - len(todo)} from {cache}, {len(todo)} to run", flush=True)
    results.update(run_jobs(todo, args.jobs, on_done=lambda result: _store(cache, result)))
    if set(guards) != {"off", "on"}:
        print(f"{time.perf_counter() - started:.0f} s; kept in {cache}; --guards off,on draws the table")
        return
    runs = []
    for label, r in results.items():
        level, strategy, guard_name, attack, seed = label.split("/")
        counts = r.guard_counts
        runs.append({"level": level, "strategy": strategy, "guard": guard_name, "attack": attack,
                     "seed": seed,
                     "initial_eval": round(r.curve[0].eval_loss, 5), "final_eval": round(r.final_loss, 5),
                     "final_trigger": _round(r.curve[-1].trigger_loss),
                     **{k: counts.get(k, 0) for k in ("honest_judged", "honest_refused", "honest_clipped",
                                                      "attack_judged", "attack_refused", "attack_clipped")}})
    write_rows(args.out / "runs.csv", runs)
    rows = _table(results, levels, strategies, attacks, seeds, args)
    if not rows:  # only the clean runs (--attacks clean): their cost and honest share are printed
        print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/runs.csv")
        return
    write_rows(args.out / "attacks.csv", rows)
    if args.plot is not None:
        _plot(args.plot, rows, levels, strategies, attacks, args)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/attacks.csv and runs.csv")


def _names(parser: argparse.ArgumentParser, text: str, known: object, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(known):  # type: ignore[call-overload]
        parser.error(f"{flag} takes a comma list of {', '.join(known)}")  # type: ignore[call-overload]
    return names


def _key(config: SimConfig) -> str:
    """A run's setting as a file name; an unguarded run does not depend on the guard."""
    text = f"{SIM_VERSION} {config!r}"
    if config.guard.mode == "off":
        text = text.replace(repr(config.guard), "guard off")
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _store(cache: Path, result: SimResult) -> None:
    """Keep what the table reads of a run: its first and last evaluation and the guard's counts."""
    cache.mkdir(parents=True, exist_ok=True)
    kept = {"curve": [vars(result.curve[0]), vars(result.curve[-1])], "guard_counts": result.guard_counts}
    (cache / f"{_key(result.config)}.json").write_text(json.dumps(kept))


def _load(cache: Path, config: SimConfig) -> SimResult | None:
    path = cache / f"{_key(config)}.json"
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return SimResult(config=config, curve=[SimPoint(**point) for point in kept["curve"]],
                     guard_counts=kept["guard_counts"])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _damage(results: dict[str, SimResult], key: str, attack: str, seed: int) -> float:
    clean = results[f"{key}/clean/{seed}"]
    attacked = results[f"{key}/{attack}/{seed}"]
    improvement = clean.curve[0].eval_loss - clean.final_loss
    return (attacked.final_loss - clean.final_loss) / improvement


def _share(results: dict[str, SimResult], key: str, seeds: list[int], who: str) -> float | None:
    """Share of ``who``'s deltas refused or clipped, over the seeds (None: it sent none)."""
    judged = hit = 0
    for seed in seeds:
        for label, r in results.items():
            if label.startswith(key + "/") and label.endswith(f"/{seed}"):
                counts = r.guard_counts
                judged += counts.get(f"{who}_judged", 0)
                hit += counts.get(f"{who}_refused", 0) + counts.get(f"{who}_clipped", 0)
    return hit / judged if judged else None


def _learnt(results: dict[str, SimResult], key: str, seeds: list[int]) -> float | None:
    """How much of the backdoor the model learnt: the control payload's loss after the trigger
    minus the payload's (about 0 when it learnt none), averaged over the seeds; None if unmeasured."""
    gaps = []
    for seed in seeds:
        last = results[f"{key}/{seed}"].curve[-1]
        if last.control_loss is None or last.trigger_loss is None:
            return None
        gaps.append(last.control_loss - last.trigger_loss)
    return statistics.fmean(gaps)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _table(results: dict[str, SimResult], levels: list[str], strategies: list[str], attacks: list[str],
           seeds: list[int], args: argparse.Namespace) -> list[dict]:
    print()
    print(f"guard clip ratio {args.clip_ratio:g}, forgive after {args.forgive_after}, "
          f"direction spread {args.direction_spread:g}, "
          f"descent check every {args.descent_every or '-'}, distrust {'on' if args.distrust else 'off'}, "
          f"seed round {'on' if args.seed_round else 'off'}; "
          f"{args.attackers} of {args.workers} workers lie (the fastest); H={args.local_steps}, "
          f"{args.budget} honest local steps, from scratch after a trusted warm start of {args.warm_start} "
          f"steps, jitter {args.jitter}, seeds {seeds}")
    print("damage = share of the clean run's improvement lost (mean ± sd over seeds)")
    rows = []
    for level in levels:
        for strategy in strategies:
            off, on = f"{level}/{strategy}/off", f"{level}/{strategy}/on"
            cost = []
            for s in seeds:
                plain, guarded = results[f"{off}/clean/{s}"], results[f"{on}/clean/{s}"]
                cost.append((guarded.final_loss - plain.final_loss)
                            / (plain.curve[0].eval_loss - plain.final_loss))
            cost_mean, cost_sd = _mean_sd(cost)
            honest = _share(results, on, seeds, "honest")
            print(f"\n{level} / {strategy}: guard's cost on the clean run {100 * cost_mean:+.2f}% ± "
                  f"{100 * cost_sd:.2f}; honest deltas refused or clipped "
                  f"{'-' if honest is None else f'{100 * honest:.2f}%'}")
            print(f"{'attack':<14} {'damage, guard off':>18} {'damage, guard on':>18} {'attack stopped':>15} "
                  f"{'trigger off/on (clean)':>28} {'learnt on (clean)':>18}")
            for attack in attacks:
                if attack == "clean":
                    continue
                d_off = _mean_sd([_damage(results, off, attack, s) for s in seeds])
                d_on = _mean_sd([_damage(results, on, attack, s) for s in seeds])
                of_attack = {k: v for k, v in results.items() if f"/{attack}/" in k}
                stopped = _share(of_attack, on, seeds, "attack")
                trigger_off = statistics.fmean(results[f"{off}/{attack}/{s}"].curve[-1].trigger_loss or 0.0
                                               for s in seeds)
                trigger_on = statistics.fmean(results[f"{on}/{attack}/{s}"].curve[-1].trigger_loss or 0.0
                                              for s in seeds)
                trigger_clean = statistics.fmean(results[f"{on}/clean/{s}"].curve[-1].trigger_loss or 0.0
                                                 for s in seeds)
                learnt_on, learnt_clean = (_learnt(results, f"{on}/{a}", seeds) for a in (attack, "clean"))
                rows.append({"level": level, "strategy": strategy, "attack": attack,
                             "workers": args.workers, "attackers": args.attackers, "seeds": len(seeds),
                             "damage_off_mean": round(d_off[0], 4), "damage_off_sd": round(d_off[1], 4),
                             "damage_on_mean": round(d_on[0], 4), "damage_on_sd": round(d_on[1], 4),
                             "attack_stopped_share": None if stopped is None else round(stopped, 3),
                             "trigger_off": round(trigger_off, 3), "trigger_on": round(trigger_on, 3),
                             "trigger_clean_on": round(trigger_clean, 3),
                             "learnt_on": _round(learnt_on), "learnt_clean_on": _round(learnt_clean),
                             "guard_cost_mean": round(cost_mean, 4), "guard_cost_sd": round(cost_sd, 4),
                             "honest_hit_share": None if honest is None else round(honest, 4)})
                shown = "-" if stopped is None else f"{100 * stopped:.0f}%"
                learnt = "" if learnt_on is None else f"{learnt_on:>9.2f} ({learnt_clean:.2f})"
                print(f"{attack:<14} {100 * d_off[0]:>10.1f}% ± {100 * d_off[1]:<4.1f} "
                      f"{100 * d_on[0]:>10.1f}% ± {100 * d_on[1]:<4.1f} {shown:>15} "
                      f"{trigger_off:>10.2f} / {trigger_on:.2f} ({trigger_clean:.2f}) {learnt}")
    return rows


def _replot(args: argparse.Namespace) -> None:
    with args.replot.open(newline="") as fh:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    if not rows:
        raise SystemExit(f"{args.replot} holds no rows")
    args.workers, args.attackers = int(rows[0]["workers"]), int(rows[0]["attackers"])
    levels, strategies, attacks = ([*dict.fromkeys(str(r[key]) for r in rows)]  # in first-seen order
                                   for key in ("level", "strategy", "attack"))
    _plot(args.plot, rows, levels, strategies, ["clean", *attacks], args)
    print(f"drew {args.plot} from {args.replot}")


def _number(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _plot(path: Path, rows: list[dict], levels: list[str], strategies: list[str], attacks: list[str],
          args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [a for a in attacks if a != "clean"]
    panels = [(lv, st) for lv in levels for st in strategies]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (level, strategy) in zip(axes[0], panels, strict=True):
        mine = {r["attack"]: r for r in rows if r["level"] == level and r["strategy"] == strategy}
        xs = range(len(shown))
        for offset, guard, colour in ((-0.2, "off", "tab:red"), (0.2, "on", "tab:green")):
            ys = [min(2.0, mine[a][f"damage_{guard}_mean"]) for a in shown]
            ax.bar([x + offset for x in xs], ys, width=0.4, color=colour, label=f"guard {guard}")
        ax.axhline(0.05, color="black", linestyle="--", linewidth=0.8, label="target 5%")
        ax.set_xticks(list(xs), shown, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("damage (share of the clean improvement; capped at 2)")
        ax.set_title(f"{level}, {strategy}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.attackers} of {args.workers} workers lie (the fastest), {args.budget} local steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
