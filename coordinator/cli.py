"""``asyncloco-coordinator``: serve a run, show (or watch) its status, export its model, delete it,
or simulate strategies.

Every option also reads an ``ASYNCLOCO_*`` environment variable (shown in ``--help``); options that
several commands share are declared once in :mod:`coordinator.options`. ``serve`` lives here,
``status`` and ``delete-run`` in :mod:`coordinator.run_cli`, the checkpoint's commands in
:mod:`coordinator.model_cli`, the volunteers' in :mod:`coordinator.volunteer_cli`, and ``simulate``
with the simulator in :mod:`coordinator.sim.cli`. The CLI modules are the only coordinator modules
that read the environment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click
import redis

from coordinator.admission import RATE_BURST_DELTAS, RATE_DELTAS_PER_MINUTE
from coordinator.checkpoint import prepare_directory, set_aside
from coordinator.config import CommitConfig, CoordinatorConfig, DashboardConfig, MetricsConfig
from coordinator.consumer import QueueConfig
from coordinator.faults import CrashPoints
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.intake import IntakeConfig
from coordinator.model_cli import export_command, key_command, sample_command
from coordinator.options import (
    commit_options,
    guard_options,
    monitoring_options,
    option,
    outer_options,
    round_options,
    run_checkpoint_dir,
    server_options,
    signing_key_path,
    task_options,
    threads_option,
    tls_option,
)
from coordinator.outer_optimizer import STRATEGIES, OuterConfig
from coordinator.parts import SpoolConfig
from coordinator.registry import PlanConfig
from coordinator.run_cli import REDIS_DOWN, delete_run_command, redis_refused, status_command
from coordinator.sim.cli import simulate
from coordinator.volunteer_cli import invite_command, revoke_command, volunteers_command
from shared.cli import OneLineErrors, version_option
from shared.errors import ConfigError, ServiceUnavailable
from shared.keys import MAX_DELTA_QUEUES
from shared.local_round import InnerConfig
from shared.settings import ConnectionSettings, connect_redis
from shared.signing import KEY_FILE_NAME, SigningKey


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
@version_option()
def main() -> None:
    """asyncloco coordinator: owns the global model of a run and applies clients' deltas."""


main.add_command(simulate)
main.add_command(invite_command)
main.add_command(revoke_command)
main.add_command(volunteers_command)
main.add_command(key_command)
main.add_command(export_command)
main.add_command(sample_command)
main.add_command(status_command)
main.add_command(delete_run_command)


@main.command()
@option("--run", env="RUN", default="default", help="Run name (several runs can share the servers).")
@option("--task", env="TASK", default="bytelm", help="'bytelm' or a user task 'package.module:factory'.")
@task_options(model_size=None, data=None)
@option("--batch-size", env="BATCH_SIZE", type=click.IntRange(1), default=None,
        help="Sequences per inner step (built-in task) [default: 16].")
@option("--task-setting", "task_settings", env="TASK_SETTINGS", multiple=True, metavar="KEY=VALUE",
        help="Extra task setting (value parsed as JSON when it can be); repeatable.")
@option("--checkpoint-dir", env="CHECKPOINT_DIR", type=click.Path(file_okay=False, path_type=Path),
        default=None, help="Where checkpoints go [default: ~/.local/state/asyncloco/coordinator/RUN, "
        "or under $XDG_STATE_HOME].")
@option("--signing-key", env="SIGNING_KEY", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="The coordinator's Ed25519 private key (PEM, mode 0600; created if missing). It signs every "
        "snapshot and plan; clients pin its public half (`asyncloco-coordinator key` prints it) "
        f"[default: CHECKPOINT_DIR/{KEY_FILE_NAME}].")
@option("--resume", env="RESUME", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@option("--fresh", env="FRESH", is_flag=True,
        help="Start over: set an existing checkpoint and applied log aside (renamed *.old) and begin "
        "a new run.")
@server_options()
@tls_option()
@option("--auth", env="AUTH", type=click.Choice([m.value for m in AuthMode]), default=AuthMode.INVITE.value,
        help="Who may send deltas: 'invite' (only volunteers invited with `invite NAME`, each under its "
        "own name) or 'open' (anyone with the broker's credentials, under any client id: a developer's "
        "machine, never a run open to strangers).")
@option("--strategy", env="STRATEGY", type=click.Choice(list(STRATEGIES)), default="edn",
        help="Outer update: Delayed Nesterov (dn), eager Delayed Nesterov (edn: the momentum part of "
        "each buffer's step at its first arrival; closest to sync per update in docs/BENCHMARKS.md), "
        "per-arrival Nesterov, plain SGD, or FedBuff.")
@outer_options()
@option("--sync-timeout", "sync_timeout_s", env="SYNC_TIMEOUT", type=click.FloatRange(0, min_open=True),
        default=120.0, help="sync strategy: seconds a round waits for missing clients after its first delta.")
@option("--outer-c", env="OUTER_C", type=click.FloatRange(0, 1), default=0.0,
        help="Delayed Nesterov c in [0, 1/N]: the share of the momentum step spread over a buffer's "
        "arrivals (Algorithm 3); capped at 1/N when N follows the active clients.")
@round_options()
@guard_options()
@option("--warm-start-client", env="WARM_START_CLIENT", default=None, metavar="ID",
        help="The client that trains the warm start alone; others wait [default: whoever sends first, "
        "with a warning].")
@option("--dylu/--no-dylu", env="DYLU", default=True, help="Dynamic Local Updates (else all run H).")
@option("--inner-lr", env="INNER_LR", type=float, default=3e-3, help="Peak AdamW learning rate.")
@option("--warmup-steps", env="WARMUP_STEPS", type=click.IntRange(0), default=50,
        help="Inner warmup, in each client's own steps.")
@option("--schedule-steps", env="SCHEDULE_STEPS", type=click.IntRange(0), default=0,
        help="Cosine horizon in global local steps (0 = flat after warmup).")
@option("--max-staleness", env="MAX_STALENESS", type=click.IntRange(0), default=0,
        help="Discard deltas whose base is more than this many applied deltas old (0 = automatic: 8 "
        "per active client, at least 32).")
@option("--max-deltas-per-minute", env="MAX_DELTAS_PER_MINUTE", type=click.FloatRange(0),
        default=RATE_DELTAS_PER_MINUTE,
        help=f"Each client's sustained pace, after a burst of {RATE_BURST_DELTAS}; faster deltas are "
        "refused rate_limited (0 = no limit). Raise it for rounds of a second or two.")
@commit_options()
@option("--part-timeout", "part_timeout_s", env="PART_TIMEOUT", type=click.FloatRange(0, min_open=True),
        default=900.0, help="Discard a delta sent in parts this many seconds after its newest part.")
@option("--part-deadline", "part_deadline_s", env="PART_DEADLINE", type=click.FloatRange(0, min_open=True),
        default=600.0, help="... or this many seconds after its first part, however often parts come.")
@option("--prefetch", env="PREFETCH", type=click.IntRange(2), default=64, help="AMQP prefetch.")
@option("--delta-queues", env="DELTA_QUEUES", type=click.IntRange(1, MAX_DELTA_QUEUES), default=1,
        help="Delta queues: each client sends to one (by its id), the coordinator consumes them all. On a "
        "RabbitMQ cluster their Raft leaders spread over the nodes (a quorum queue's publishes all go "
        "through its leader); one per node.")
@option("--max-queue-bytes", env="MAX_QUEUE_BYTES", type=click.IntRange(1), default=1024**3,
        help="Bytes of deltas waiting in a delta queue (each of --delta-queues; not counting up to "
        "--prefetch already delivered); "
        "beyond, the broker refuses publishes and clients back off. Fixed when the queue is declared.")
@option("--eval-interval", "eval_interval_s", env="EVAL_INTERVAL", type=float, default=10.0,
        help="Seconds between evaluations of the global model.")
@option("--max-seconds", env="MAX_SECONDS", type=click.FloatRange(0), default=0.0,
        help="Stop after this long (0 = serve until stopped).")
@monitoring_options()
@threads_option(default=None)
@option("--log-level", env="LOG_LEVEL", default="info",
        type=click.Choice(["debug", "info", "warning", "error"]))
@option("--crash-at", env="CRASH_AT", default=None, hidden=True,
        help="Fault tests only: exit like kill -9 the N-th time POINT is passed (POINT[:N]).")
def serve(**opts: Any) -> None:
    """Serve a run: publish snapshots, apply deltas, commit, evaluate."""
    _setup_logging(opts["log_level"])
    crash = CrashPoints(opts["crash_at"])  # a bad --crash-at fails here, before anything changes
    # A checkpoint directory that cannot be written fails here, before a key is made in it.
    prepare_directory(run_checkpoint_dir(opts["run"], opts["checkpoint_dir"]))
    # A key file others can read fails here too, before --fresh sets anything aside.
    signing_key = SigningKey.load_or_create(signing_key_path(opts["signing_key"], opts["checkpoint_dir"],
                                                             opts["run"]))
    config = _serve_config(opts)
    if opts["threads"]:
        import torch

        torch.set_num_threads(opts["threads"])
    from coordinator.service import Coordinator

    client = connect_redis(config.connection)
    try:
        coordinator = Coordinator(config, redis=client, signing_key=signing_key, crash=crash)
        _install_signals(coordinator.stop)
        coordinator.serve()
    except REDIS_DOWN as exc:
        raise ServiceUnavailable(
            f"cannot reach Redis at {config.connection.redis_url} ({exc}); start it "
            "(make services) or pass --redis"
        ) from exc
    except redis.exceptions.ResponseError as exc:
        raise redis_refused(config.connection.redis_url, exc) from exc
    finally:
        client.close()
    click.echo(f"coordinator stopped at version {coordinator.version}")


def _serve_config(opts: dict[str, Any]) -> CoordinatorConfig:
    """The resolved config of ``serve``; with ``--fresh``, once it is valid, the old run set aside."""
    if opts["fresh"] and opts["resume"]:
        raise ConfigError("--fresh and --resume exclude each other")
    settings = dict(_parse_setting(s) for s in opts["task_settings"])
    for key in ("model_size", "data", "batch_size"):
        if opts[key] is not None:
            settings[key] = opts[key]
    run = opts["run"]
    checkpoint_dir = run_checkpoint_dir(run, opts["checkpoint_dir"])
    config = CoordinatorConfig(
        run=run,
        task=opts["task"],
        task_settings=settings,
        seed=opts["seed"],
        inner=InnerConfig(lr=opts["inner_lr"], warmup_steps=opts["warmup_steps"],
                          schedule_steps=opts["schedule_steps"]),
        outer=OuterConfig(strategy=opts["strategy"], lr=opts["outer_lr"], momentum=opts["outer_momentum"],
                          buffer_size=opts["buffer_size"], min_buffer=opts["min_buffer"], c=opts["outer_c"],
                          staleness_exponent=opts["staleness_exponent"],
                          compute_exponent=opts["compute_exponent"], weight_cap=opts["weight_cap"]),
        plan=PlanConfig(local_steps=opts["local_steps"], min_local_steps=opts["min_local_steps"],
                        dylu=opts["dylu"], warm_start_steps=opts["warm_start_steps"],
                        grace_rounds=opts["grace_rounds"],
                        warm_start_client=opts["warm_start_client"] or ""),
        sync_timeout_s=opts["sync_timeout_s"],
        intake=IntakeConfig(max_staleness=opts["max_staleness"],
                            max_deltas_per_minute=opts["max_deltas_per_minute"]),
        guard=GuardConfig(mode=opts["guard"], reject_ratio=opts["guard_reject_ratio"],
                          clip_ratio=opts["guard_clip_ratio"], min_cosine=opts["guard_min_cosine"],
                          forgive_after=opts["guard_forgive_after"],
                          direction_spread=opts["guard_direction_spread"], distrust=opts["guard_distrust"],
                          seed_round=opts["guard_seed_round"], strikes=opts["guard_strikes"],
                          descent_every=opts["guard_descent_every"],
                          descent_tolerance=opts["guard_descent_tolerance"]),
        commit=CommitConfig(every_updates=opts["commit_every"], interval_s=opts["commit_interval_s"],
                            idle_interval_s=opts["commit_idle_s"], max_share=opts["commit_max_share"],
                            patch_codec=opts["patch_codec"]),
        queue=QueueConfig(prefetch=opts["prefetch"], max_queue_bytes=opts["max_queue_bytes"],
                          count=opts["delta_queues"]),
        spool=SpoolConfig(timeout_s=opts["part_timeout_s"], deadline_s=opts["part_deadline_s"]),
        connection=ConnectionSettings(redis_url=opts["redis_url"], amqp_url=opts["amqp_url"],
                                      tls_ca_file=opts["tls_ca"]),
        checkpoint_dir=checkpoint_dir,
        resume=opts["resume"],
        eval_interval_s=opts["eval_interval_s"],
        max_seconds=opts["max_seconds"],
        auth=AuthMode(opts["auth"]),
        metrics=MetricsConfig(port=opts["metrics_port"], host=opts["metrics_host"]),
        dashboard=DashboardConfig(port=opts["dashboard_port"], host=opts["dashboard_host"]),
    )
    if opts["fresh"]:
        aside = set_aside(checkpoint_dir)
        if aside is not None:
            click.echo(f"previous checkpoint set aside as {aside}", err=True)
    return config


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


if __name__ == "__main__":
    main()
