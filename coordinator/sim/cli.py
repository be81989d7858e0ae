"""``asyncloco-coordinator simulate``: compare strategies on a virtual clock, on one machine.

The command is registered on the coordinator's group by :mod:`coordinator.cli`; its options read
``ASYNCLOCO_*`` environment variables like every other coordinator option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from coordinator.options import option, outer_options, round_options, task_options, threads_option
from shared.errors import ConfigError


@click.command()
@option("--strategies", env="SIM_STRATEGIES", default="sync,dn+dylu,edn+dylu",
        help="Comma list: sync, or dn|edn|nesterov|sgd|fedbuff with an optional '+dylu'.")
@option("--workers", env="SIM_WORKERS", type=click.IntRange(1, 1024), default=4, help="Simulated workers.")
@option("--heterogeneity", env="SIM_HETEROGENEITY", default="very",
        type=click.Choice(["none", "slight", "moderate", "very", "lognormal"]),
        help="Speed profile (slowest/fastest: 1, 1/1.5, 1/3, 1/8; or lognormal with --sigma).")
@option("--speeds", env="SIM_SPEEDS", default=None, help="Explicit relative speeds, e.g. 1,0.5,0.25.")
@option("--sigma", env="SIM_SIGMA", type=click.FloatRange(0), default=0.75, help="Lognormal spread.")
@round_options()
@option("--budget-steps", env="SIM_BUDGET_STEPS", type=click.IntRange(1), default=1200,
        help="Total local steps of all workers per strategy (equal compute).")
@option("--eval-every", env="SIM_EVAL_EVERY", type=click.IntRange(1), default=200,
        help="Evaluate every this many total local steps.")
@outer_options()
@option("--codec", env="CODEC", type=click.Choice(["fp32", "fp16", "int8", "int4", "int3", "topk"]),
        default="fp16")
@option("--latency", env="SIM_LATENCY", type=click.FloatRange(0), default=0.0,
        help="Upload latency, in steps of the fastest worker.")
@option("--jitter", env="SIM_JITTER", type=click.FloatRange(0, 1), default=0.0,
        help="Round-to-round speed noise: each round's speed is drawn from speed x lognormal(0, jitter).")
@option("--churn-leave", env="SIM_CHURN_LEAVE", type=click.FloatRange(0, 0.99), default=0.0,
        help="Chance that a worker leaves after a round.")
@option("--churn-offline", env="SIM_CHURN_OFFLINE", type=click.FloatRange(0), default=0.0,
        help="Mean time a worker stays away (exponential).")
@task_options(model_size="tiny", data="stdlib")
@option("--out", env="SIM_OUT", type=click.Path(file_okay=False, path_type=Path),
        default=Path("results/simulate"), help="Folder for simulate.csv and simulate.png.")
@threads_option(default=1)
def simulate(**opts: Any) -> None:
    """Simulate W heterogeneous workers on a virtual clock with the real round, codec and outer code."""
    import torch

    from coordinator.outer_optimizer import OuterConfig
    from coordinator.sim.report import plot_png, write_csv
    from coordinator.sim.simulator import SimConfig, Simulation, speed_profile
    from shared.tasks import load_task

    # Every setting is checked before anything runs or changes the process (torch's threads).
    if opts["speeds"]:
        try:
            speeds = tuple(float(x) for x in opts["speeds"].split(","))
        except ValueError as exc:
            raise ConfigError(f"--speeds takes numbers like 1,0.5,0.25, got {opts['speeds']!r}") from exc
    else:
        speeds = tuple(speed_profile(opts["heterogeneity"], opts["workers"], sigma=opts["sigma"],
                                     seed=opts["seed"]))
    outer = OuterConfig(lr=opts["outer_lr"], momentum=opts["outer_momentum"],
                        buffer_size=opts["buffer_size"], min_buffer=opts["min_buffer"],
                        staleness_exponent=opts["staleness_exponent"],
                        compute_exponent=opts["compute_exponent"], weight_cap=opts["weight_cap"])
    configs = [
        SimConfig(strategy=s.strip(), speeds=speeds, local_steps=opts["local_steps"],
                  min_local_steps=opts["min_local_steps"], budget_steps=opts["budget_steps"],
                  eval_every_steps=opts["eval_every"], outer=outer, codec=opts["codec"],
                  latency=opts["latency"], jitter=opts["jitter"], churn_leave_prob=opts["churn_leave"],
                  churn_offline_mean=opts["churn_offline"], warm_start_steps=opts["warm_start_steps"],
                  grace_rounds=opts["grace_rounds"],
                  seed=opts["seed"])
        for s in opts["strategies"].split(",") if s.strip()
    ]
    if not configs:
        raise ConfigError("--strategies names no strategy")
    torch.set_num_threads(opts["threads"])
    task = load_task("bytelm", {"model_size": opts["model_size"], "data": opts["data"]})
    simulation = Simulation(task)
    click.echo(f"speeds {', '.join(f'{v:.3g}' for v in speeds)}; H={opts['local_steps']}; "
               f"budget {opts['budget_steps']} local steps; seed {opts['seed']}")
    click.echo(f"{'strategy':<14} {'final eval':>10} {'virtual time':>12} {'updates':>8} {'max stale':>9}")
    results = {}
    for config in configs:
        result = simulation.run(config)
        results[config.strategy] = result
        last = result.curve[-1]
        click.echo(f"{config.strategy:<14} {last.eval_loss:>10.4f} {last.virtual_time:>12.1f} "
                   f"{last.updates:>8} {result.max_staleness:>9}")
    out: Path = opts["out"]
    write_csv(out / "simulate.csv", results)
    drawn = plot_png(out / "simulate.png", results, title=f"speeds {speeds}, H={opts['local_steps']}")
    click.echo(f"wrote {out / 'simulate.csv'}" + (f" and {out / 'simulate.png'}" if drawn else ""))
