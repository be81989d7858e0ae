"""``asyncloco-coordinator``: serve a run, or show its status.

Every option also reads an ``ASYNCLOCO_*`` environment variable (shown in ``--help``). This is the
only coordinator module that reads the environment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import click
import redis

from coordinator.config import CommitConfig, CoordinatorConfig
from coordinator.consumer import QueueConfig
from coordinator.intake import IntakeConfig
from coordinator.outer_optimizer import STRATEGIES, OuterConfig
from coordinator.parts import SpoolConfig
from coordinator.registry import PlanConfig
from coordinator.status import read_status, render_text
from shared.cli import OneLineErrors
from shared.errors import ConfigError, ServiceUnavailable
from shared.keys import RunKeys
from shared.local_round import InnerConfig
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, ConnectionSettings

ENV = "ASYNCLOCO_"


def _opt(*names: str, env: str, **kwargs: Any) -> Any:
    return click.option(*names, envvar=ENV + env, show_envvar=True, show_default=True, **kwargs)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "asyncloco"


def _parse_setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--task-setting takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # its own reconnect chatter; we log ours


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
def main() -> None:
    """asyncloco coordinator: owns the global model of a run and applies clients' deltas."""


@main.command()
@_opt("--run", env="RUN", default="default", help="Run name (several runs can share the servers).")
@_opt("--task", env="TASK", default="bytelm", help="'bytelm' or a user task 'package.module:factory'.")
@_opt("--model-size", env="MODEL_SIZE", type=click.Choice(["tiny", "small"]), default=None,
      help="Size of the built-in byte-level LM [default: tiny].")
@_opt("--data", env="DATA", default=None,
      help="Corpus: 'stdlib' (this Python's own sources) or a glob of text files [default: stdlib].")
@_opt("--batch-size", env="BATCH_SIZE", type=click.IntRange(1), default=None,
      help="Sequences per inner step (built-in task) [default: 16].")
@_opt("--task-setting", "task_settings", env="TASK_SETTINGS", multiple=True, metavar="KEY=VALUE",
      help="Extra task setting (value parsed as JSON when it can be); repeatable.")
@_opt("--seed", env="SEED", type=int, default=0, help="Seed of the initial model.")
@_opt("--checkpoint-dir", env="CHECKPOINT_DIR", type=click.Path(file_okay=False, path_type=Path),
      default=None, help="Where checkpoints go [default: ~/.local/state/asyncloco/coordinator/RUN].")
@_opt("--resume", env="RESUME", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@_opt("--fresh", env="FRESH", is_flag=True,
      help="Start over: set an existing checkpoint aside (renamed *.old) and begin a new run.")
@_opt("--redis", "redis_url", env="REDIS", default=DEFAULT_REDIS_URL, help="Redis URL.")
@_opt("--amqp", "amqp_url", env="AMQP", default=DEFAULT_AMQP_URL, help="RabbitMQ URL.")
@_opt("--strategy", env="STRATEGY", type=click.Choice(list(STRATEGIES)), default="dn",
      help="Outer update: Delayed Nesterov, per-arrival Nesterov, plain SGD, or FedBuff.")
@_opt("--staleness-exponent", env="STALENESS_EXPONENT", type=click.FloatRange(0), default=0.0,
      help="Weigh a delta by (1 + staleness)^-a (0 = off).")
@_opt("--sync-timeout", "sync_timeout_s", env="SYNC_TIMEOUT", type=click.FloatRange(0, min_open=True),
      default=120.0, help="sync strategy: seconds a round waits for missing clients after its first delta.")
@_opt("--outer-lr", env="OUTER_LR", type=float, default=0.7, help="Outer learning rate ε.")
@_opt("--outer-momentum", env="OUTER_MOMENTUM", type=float, default=0.9, help="Outer momentum β.")
@_opt("--buffer-size", env="BUFFER_SIZE", type=click.IntRange(0), default=0,
      help="Delayed Nesterov N (0 = number of active clients).")
@_opt("--outer-c", env="OUTER_C", type=float, default=0.0, help="Momentum share c between updates.")
@_opt("--local-steps", env="LOCAL_STEPS", type=click.IntRange(1), default=30,
      help="H: local steps per round of the fastest client.")
@_opt("--min-local-steps", env="MIN_LOCAL_STEPS", type=click.IntRange(1), default=3, help="H_min.")
@_opt("--warm-start-steps", env="WARM_START_STEPS", type=click.IntRange(0), default=0,
      help="Train the first this many local steps as one client alone (ordinary training), then "
      "asynchronously (0 = off).")
@_opt("--dylu/--no-dylu", env="DYLU", default=True, help="Dynamic Local Updates (else all run H).")
@_opt("--inner-lr", env="INNER_LR", type=float, default=3e-3, help="Peak AdamW learning rate.")
@_opt("--warmup-steps", env="WARMUP_STEPS", type=click.IntRange(0), default=50,
      help="Inner warmup, in each client's own steps.")
@_opt("--schedule-steps", env="SCHEDULE_STEPS", type=click.IntRange(0), default=0,
      help="Cosine horizon in global local steps (0 = flat after warmup).")
@_opt("--max-staleness", env="MAX_STALENESS", type=click.IntRange(0), default=32,
      help="Discard deltas based more than this many versions back.")
@_opt("--commit-every", env="COMMIT_EVERY", type=click.IntRange(1), default=16,
      help="Commit after this many deltas ...")
@_opt("--commit-interval", "commit_interval_s", env="COMMIT_INTERVAL", type=float, default=2.0,
      help="... or this many seconds after the first uncommitted one.")
@_opt("--commit-idle", "commit_idle_s", env="COMMIT_IDLE", type=click.FloatRange(0), default=0.25,
      help="... or, when no delivery waits, this many seconds after the last commit.")
@_opt("--part-timeout", "part_timeout_s", env="PART_TIMEOUT", type=click.FloatRange(0, min_open=True),
      default=900.0, help="Discard a delta sent in parts this many seconds after its newest part.")
@_opt("--prefetch", env="PREFETCH", type=click.IntRange(2), default=64, help="AMQP prefetch.")
@_opt("--max-queue-bytes", env="MAX_QUEUE_BYTES", type=click.IntRange(1), default=1024**3,
      help="Bytes of deltas waiting in the queue (not counting up to --prefetch already delivered); "
      "beyond, the broker refuses publishes and clients back off. Fixed when the queue is declared.")
@_opt("--eval-interval", "eval_interval_s", env="EVAL_INTERVAL", type=float, default=10.0,
      help="Seconds between evaluations of the global model.")
@_opt("--max-seconds", env="MAX_SECONDS", type=click.FloatRange(0), default=0.0,
      help="Stop after this long (0 = serve until stopped).")
@_opt("--threads", env="THREADS", type=click.IntRange(1), default=None, help="torch CPU threads.")
@_opt("--log-level", env="LOG_LEVEL", default="info",
      type=click.Choice(["debug", "info", "warning", "error"]))
@_opt("--crash-at", env="CRASH_AT", default=None, hidden=True,
      help="Fault tests only: exit like kill -9 the N-th time POINT is passed (POINT[:N]).")
def serve(**opts: Any) -> None:
    """Serve a run: publish snapshots, apply deltas, commit, evaluate."""
    _setup_logging(opts["log_level"])
    if opts["threads"]:
        import torch

        torch.set_num_threads(opts["threads"])
    config = _serve_config(opts)
    from coordinator.service import Coordinator

    coordinator = Coordinator(config)
    _install_signals(coordinator.stop)
    try:
        coordinator.serve()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ServiceUnavailable(
            f"cannot reach Redis at {config.connection.redis_url} ({exc}); start it "
            "(make services) or pass --redis"
        ) from exc
    click.echo(f"coordinator stopped at version {coordinator.version}")


def _serve_config(opts: dict[str, Any]) -> CoordinatorConfig:
    settings = dict(_parse_setting(s) for s in opts["task_settings"])
    for key in ("model_size", "data", "batch_size"):
        if opts[key] is not None:
            settings[key] = opts[key]
    checkpoint_dir = opts["checkpoint_dir"] or default_state_dir() / "coordinator" / opts["run"]
    if opts["fresh"]:
        if opts["resume"]:
            raise ConfigError("--fresh and --resume exclude each other")
        existing = checkpoint_dir / "checkpoint.safetensors"
        if existing.exists():
            aside = existing.with_name(f"checkpoint.{int(time.time())}.old")
            existing.rename(aside)
            click.echo(f"previous checkpoint set aside as {aside}", err=True)
            applied_log = checkpoint_dir / "applied.jsonl"  # that run's record goes aside with it
            if applied_log.exists():
                applied_log.rename(aside.with_name(f"applied.{int(time.time())}.jsonl.old"))
    return CoordinatorConfig(
        run=opts["run"],
        task=opts["task"],
        task_settings=settings,
        seed=opts["seed"],
        inner=InnerConfig(lr=opts["inner_lr"], warmup_steps=opts["warmup_steps"],
                          schedule_steps=opts["schedule_steps"]),
        outer=OuterConfig(strategy=opts["strategy"], lr=opts["outer_lr"], momentum=opts["outer_momentum"],
                          buffer_size=opts["buffer_size"], c=opts["outer_c"],
                          staleness_exponent=opts["staleness_exponent"]),
        plan=PlanConfig(local_steps=opts["local_steps"], min_local_steps=opts["min_local_steps"],
                        dylu=opts["dylu"], sync=opts["strategy"] == "sync",
                        warm_start_steps=opts["warm_start_steps"]),
        sync_timeout_s=opts["sync_timeout_s"],
        intake=IntakeConfig(max_staleness=opts["max_staleness"]),
        commit=CommitConfig(every_updates=opts["commit_every"], interval_s=opts["commit_interval_s"],
                            idle_interval_s=opts["commit_idle_s"]),
        queue=QueueConfig(prefetch=opts["prefetch"], max_queue_bytes=opts["max_queue_bytes"]),
        spool=SpoolConfig(timeout_s=opts["part_timeout_s"]),
        connection=ConnectionSettings(redis_url=opts["redis_url"], amqp_url=opts["amqp_url"]),
        checkpoint_dir=checkpoint_dir,
        resume=opts["resume"],
        eval_interval_s=opts["eval_interval_s"],
        max_seconds=opts["max_seconds"],
        crash_at=opts["crash_at"],
    )


def _install_signals(stop: Any) -> None:
    """First Ctrl-C / SIGTERM: commit and stop cleanly. Second Ctrl-C: leave at once."""
    state = {"count": 0}

    def handler(signum: int, frame: Any) -> None:
        state["count"] += 1
        if state["count"] > 1:
            os._exit(130)
        click.echo("stopping: committing what was applied (Ctrl-C again to abort)", err=True)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@main.command()
@_opt("--run", env="RUN", default="default", help="Run name.")
@_opt("--json", "as_json", env="STATUS_JSON", is_flag=True, help="Print the stable JSON document.")
@_opt("--redis", "redis_url", env="REDIS", default=DEFAULT_REDIS_URL, help="Redis URL.")
@_opt("--amqp", "amqp_url", env="AMQP", default=DEFAULT_AMQP_URL,
      help="RabbitMQ URL (for the live queue depth).")
def status(run: str, as_json: bool, redis_url: str, amqp_url: str) -> None:
    """Show a run: version, eval loss history, clients, rejections, queue depth."""
    keys = RunKeys(run)
    ConnectionSettings(redis_url=redis_url, amqp_url=amqp_url)
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        doc = read_status(client, keys)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {redis_url} ({exc})") from exc
    if doc is None:
        raise ConfigError(f"no status for run {run!r}: no coordinator has served it on this Redis")
    depth = _live_queue_depth(amqp_url, keys)
    if depth is not None:
        doc["queue"]["depth"] = depth
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else render_text(doc))


@main.command()
@_opt("--strategies", env="SIM_STRATEGIES", default="sync,nesterov,dn,dn+dylu",
      help="Comma list: sync, or dn|nesterov|sgd|fedbuff with an optional '+dylu'.")
@_opt("--workers", env="SIM_WORKERS", type=click.IntRange(1, 1024), default=4, help="Simulated workers.")
@_opt("--heterogeneity", env="SIM_HETEROGENEITY", default="very",
      type=click.Choice(["none", "slight", "moderate", "very", "lognormal"]),
      help="Speed profile (slowest/fastest: 1, 1/1.5, 1/3, 1/8; or lognormal with --sigma).")
@_opt("--speeds", env="SIM_SPEEDS", default=None, help="Explicit relative speeds, e.g. 1,0.5,0.25.")
@_opt("--sigma", env="SIM_SIGMA", type=click.FloatRange(0), default=0.75, help="Lognormal spread.")
@_opt("--local-steps", env="LOCAL_STEPS", type=click.IntRange(1), default=30, help="H.")
@_opt("--min-local-steps", env="MIN_LOCAL_STEPS", type=click.IntRange(1), default=3, help="H_min.")
@_opt("--budget-steps", env="SIM_BUDGET_STEPS", type=click.IntRange(1), default=1200,
      help="Total local steps of all workers per strategy (equal compute).")
@_opt("--eval-every", env="SIM_EVAL_EVERY", type=click.IntRange(1), default=200,
      help="Evaluate every this many total local steps.")
@_opt("--outer-lr", env="OUTER_LR", type=float, default=0.7, help="Outer learning rate ε.")
@_opt("--outer-momentum", env="OUTER_MOMENTUM", type=float, default=0.9, help="Outer momentum β.")
@_opt("--staleness-exponent", env="STALENESS_EXPONENT", type=click.FloatRange(0), default=0.0,
      help="Weigh a delta by (1 + staleness)^-a.")
@_opt("--buffer-size", env="BUFFER_SIZE", type=click.IntRange(0), default=0,
      help="Delayed Nesterov N (0 = number of workers online).")
@_opt("--warm-start-steps", env="WARM_START_STEPS", type=click.IntRange(0), default=0,
      help="The fastest worker trains alone (ordinary training) for this many local steps first.")
@_opt("--codec", env="CODEC", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16")
@_opt("--latency", env="SIM_LATENCY", type=click.FloatRange(0), default=0.0,
      help="Upload latency, in steps of the fastest worker.")
@_opt("--churn-leave", env="SIM_CHURN_LEAVE", type=click.FloatRange(0, 0.99), default=0.0,
      help="Chance that a worker leaves after a round.")
@_opt("--churn-offline", env="SIM_CHURN_OFFLINE", type=click.FloatRange(0), default=0.0,
      help="Mean time a worker stays away (exponential).")
@_opt("--model-size", env="MODEL_SIZE", type=click.Choice(["tiny", "small"]), default="tiny")
@_opt("--data", env="DATA", default="stdlib", help="Corpus: 'stdlib' or a glob.")
@_opt("--seed", env="SEED", type=int, default=0)
@_opt("--out", env="SIM_OUT", type=click.Path(file_okay=False, path_type=Path),
      default=Path("results/simulate"), help="Folder for simulate.csv and simulate.png.")
@_opt("--threads", env="THREADS", type=click.IntRange(1), default=1, help="torch CPU threads.")
def simulate(**opts: Any) -> None:
    """Simulate W heterogeneous workers on a virtual clock with the real round, codec and outer code."""
    import torch

    from coordinator.sim_report import plot_png, write_csv
    from coordinator.simulator import SimConfig, Simulation, speed_profile
    from shared.tasks import load_task

    torch.set_num_threads(opts["threads"])
    if opts["speeds"]:
        try:
            speeds = tuple(float(x) for x in opts["speeds"].split(","))
        except ValueError as exc:
            raise ConfigError(f"--speeds takes numbers like 1,0.5,0.25, got {opts['speeds']!r}") from exc
    else:
        speeds = tuple(speed_profile(opts["heterogeneity"], opts["workers"], sigma=opts["sigma"],
                                     seed=opts["seed"]))
    outer = OuterConfig(lr=opts["outer_lr"], momentum=opts["outer_momentum"],
                        buffer_size=opts["buffer_size"], staleness_exponent=opts["staleness_exponent"])
    configs = [
        SimConfig(strategy=s.strip(), speeds=speeds, local_steps=opts["local_steps"],
                  min_local_steps=opts["min_local_steps"], budget_steps=opts["budget_steps"],
                  eval_every_steps=opts["eval_every"], outer=outer, codec=opts["codec"],
                  latency=opts["latency"], churn_leave_prob=opts["churn_leave"],
                  churn_offline_mean=opts["churn_offline"], warm_start_steps=opts["warm_start_steps"],
                  seed=opts["seed"])
        for s in opts["strategies"].split(",") if s.strip()
    ]
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


def _live_queue_depth(amqp_url: str, keys: RunKeys) -> int | None:
    import pika
    import pika.exceptions

    try:
        params = pika.URLParameters(amqp_url)
        params.socket_timeout = 3
        params.blocked_connection_timeout = 3
        params.connection_attempts = 1
        connection = pika.BlockingConnection(params)
        try:
            return int(connection.channel().queue_declare(keys.delta_queue, passive=True)
                       .method.message_count)
        finally:
            connection.close()
    except (pika.exceptions.AMQPError, OSError):
        return None


if __name__ == "__main__":
    main()
