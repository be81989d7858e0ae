"""Click options that several ``asyncloco-coordinator`` commands share, each declared once.

Every option also reads an ``ASYNCLOCO_*`` environment variable (shown in ``--help``); like the
command modules that apply them, this is CLI code, the only coordinator code that reads the
environment. A group decorator applies its options in the order they are listed in ``--help``.
Where two commands need a different default, the group takes it as a parameter, so that each
command's behaviour stays visible where the command is declared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from coordinator.guard import GUARD_MODES, GuardConfig
from shared.files import default_state_dir
from shared.keys import validate_run_name
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from shared.signing import KEY_FILE_NAME
from shared.snapshot_patch import DEFAULT_PATCH_CODEC, PATCH_CODECS
from shared.tasks.bytelm import MODEL_SIZES

ENV = "ASYNCLOCO_"

F = TypeVar("F", bound=Callable[..., Any])


def option(*names: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that also reads ``ASYNCLOCO_<env>`` and shows its default in ``--help``."""
    return click.option(*names, envvar=ENV + env, show_envvar=True, show_default=True, **kwargs)


def _group(*options: Callable[[F], F]) -> Callable[[F], F]:
    """Apply ``options`` so that they appear in ``--help`` in the order given."""

    def apply(command: F) -> F:
        for decorate in reversed(options):
            command = decorate(command)
        return command

    return apply


def outer_options() -> Callable[[F], F]:
    """The outer optimizer: --outer-lr, --outer-momentum, --staleness-exponent, --compute-exponent,
    --weight-cap, --buffer-size, --min-buffer."""
    return _group(
        option("--outer-lr", env="OUTER_LR", type=float, default=0.5,
               help="Outer learning rate ε. 0.5 with β 0.8 was best in every run we measured with small H "
               "(DiLoCo's 0.7/0.9 swung: docs/BENCHMARKS.md)."),
        option("--outer-momentum", env="OUTER_MOMENTUM", type=float, default=0.8, help="Outer momentum β."),
        option("--staleness-exponent", env="STALENESS_EXPONENT", type=click.FloatRange(0), default=0.0,
               help="Weigh a delta by (1 + staleness)^-a (0 = off)."),
        option("--compute-exponent", env="COMPUTE_EXPONENT", type=click.FloatRange(0, 4), default=1.0,
               help="Weigh a delta of H_i local steps by (H_i/H)^p, N counted in those weights "
               "(0 = every delta alike). Under DyLU it keeps slow clients' short rounds from "
               "diluting the step (p = 1 measured best: docs/BENCHMARKS.md)."),
        option("--weight-cap", env="WEIGHT_CAP", type=click.FloatRange(0), default=0.0,
               help="With 3 or more clients active, hold each one's compute weight to this times the "
               "others' together (0.5: nobody holds over a third of a step), so that the fastest "
               "volunteer cannot outweigh everyone else (0 = off; docs/SECURITY.md)."),
        option("--buffer-size", env="BUFFER_SIZE", type=click.IntRange(0), default=0,
               help="Delayed Nesterov N (0 = number of active clients)."),
        option("--min-buffer", env="MIN_BUFFER", type=click.IntRange(1), default=1,
               help="With --buffer-size 0: N is at least this (so the run's first deltas, from the one "
               "client heard from so far, do not each take a whole momentum step)."),
    )


def guard_options() -> Callable[[F], F]:
    """The delta guard (coordinator/guard.py): --guard, --guard-reject-ratio, --guard-clip-ratio,
    --guard-min-cosine, --guard-forgive-after, --guard-direction-spread, --guard-distrust,
    --guard-seed-round, --guard-strikes, --guard-descent-every, --guard-descent-tolerance."""
    return _group(
        option("--guard", env="GUARD", type=click.Choice(GUARD_MODES), default="clip",
               help="Judge each delta before it moves θ: 'screen' refuses outliers (norm, one tensor's "
               "share, direction against the server's momentum), 'clip' also clips the rest around the "
               "momentum (centered clipping), 'off' keeps only the absolute checks (docs/SECURITY.md)."),
        option("--guard-reject-ratio", env="GUARD_REJECT_RATIO", type=click.FloatRange(1, min_open=True),
               default=GuardConfig.reject_ratio,
               help="Refuse a delta whose norm (scaled to a full round) is beyond this many times the "
               "median of recent accepted ones; raise it if honest volunteers see norm_outlier."),
        option("--guard-clip-ratio", env="GUARD_CLIP_RATIO", type=click.FloatRange(0, min_open=True),
               default=GuardConfig.clip_ratio,
               help="Clip a delta's distance to the momentum's mean at this many times the median "
               "distance; raise it if status shows many honest deltas clipped."),
        option("--guard-min-cosine", env="GUARD_MIN_COSINE", type=click.FloatRange(-1, 1),
               default=GuardConfig.min_cosine,
               help="Refuse a delta whose cosine to the server's momentum is below this (-1: never)."),
        option("--guard-forgive-after", env="GUARD_FORGIVE_AFTER", type=click.IntRange(0, GuardConfig.window),
               default=GuardConfig.forgive_after,
               help="Forgive a volunteer one delta against the momentum when its last this many all pointed "
               "along it (honest rounds dip a little below 0 late in a run; 0: never)."),
        option("--guard-direction-spread", env="GUARD_DIRECTION_SPREAD", type=click.FloatRange(0, 10),
               default=GuardConfig.direction_spread,
               help="Refuse for direction only below min(--guard-min-cosine, median - this x sigma of the "
               "recent accepted deltas' cosines): late in a run the momentum's direction fades (0: off)."),
        option("--guard-distrust/--no-guard-distrust", env="GUARD_DISTRUST", default=GuardConfig.distrust,
               help="Judged by the senders' reference, make a volunteer whose deltas mostly pointed "
               "against it reach the median cosine of accepted deltas, or lower the loss on a batch "
               "of the operator's data, to pass; try a run's first deltas, and those the momentum's "
               "valve would let in, on that data too: holds back a fast sign-flipper "
               "(docs/SECURITY.md). On by default."),
        option("--guard-seed-round/--no-guard-seed-round", env="GUARD_SEED_ROUND",
               default=GuardConfig.seed_round,
               help="At a fresh start, train one round on the coordinator (H steps on a batch stream of "
               "the task's data drawn with its secret seed) and let the guard learn a delta's size and "
               "direction from it, so that it does not start blind; θ is not moved (coordinator/"
               "seed_round.py). Skipped on a resume and after a warm start by a named holder. On by "
               "default."),
        option("--guard-strikes", env="GUARD_STRIKES", type=click.IntRange(0, GuardConfig.record),
               default=GuardConfig.strikes,
               help=f"Put a volunteer on probation (its deltas judged, not applied) while this many of its "
               f"last {GuardConfig.record} were refused for size or clipped (0: never)."),
        option("--guard-descent-every", env="GUARD_DESCENT_EVERY", type=click.IntRange(0),
               default=GuardConfig.descent_every,
               help="Try every K-th delta that passes on a fresh batch of the task's data drawn with the "
               "coordinator's secret seed, and refuse it if the loss rises (two forward passes on the "
               "coordinator; 0: off)."),
        option("--guard-descent-tolerance", env="GUARD_DESCENT_TOLERANCE", type=click.FloatRange(0),
               default=GuardConfig.descent_tolerance,
               help="The rise of that loss, as a share of it, that refuses a delta."),
    )


def commit_options() -> Callable[[F], F]:
    """When ``serve`` commits (coordinator.commit_batch): --commit-every, --commit-interval,
    --commit-idle, --commit-max-share, and the patches between its snapshots: --snapshot-patches."""
    return _group(
        option("--commit-every", env="COMMIT_EVERY", type=click.IntRange(1), default=16,
               help="Commit after this many deltas ..."),
        option("--commit-interval", "commit_interval_s", env="COMMIT_INTERVAL", type=float, default=2.0,
               help="... or this many seconds after the first uncommitted one."),
        option("--commit-idle", "commit_idle_s", env="COMMIT_IDLE", type=click.FloatRange(0), default=0.25,
               help="... or, when no delivery waits, this many seconds after the last commit."),
        option("--commit-max-share", env="COMMIT_MAX_SHARE", type=click.FloatRange(0, 1, min_open=True),
               default=0.25,
               help="Space commits so that they take at most this share of the coordinator's time (a big "
               "model's slow commits come less often than the three rules above would make them)."),
        option("--snapshot-patches", "patch_codec", env="SNAPSHOT_PATCHES",
               type=click.Choice([*PATCH_CODECS, "none"]), default=DEFAULT_PATCH_CODEC,
               help="With each snapshot, publish the patch from the one before in this codec: clients a "
               "version or a few behind download it instead of the whole fp32 snapshot. Costs the "
               "coordinator one fp32 copy of the model; none: whole snapshots only."),
    )


def monitoring_options() -> Callable[[F], F]:
    """Where ``serve`` shows itself: --metrics-port, --metrics-host, --dashboard, --dashboard-host."""
    return _group(
        option("--metrics-port", env="METRICS_PORT", type=click.IntRange(0, 65535), default=0,
               help="Serve Prometheus metrics on http://HOST:PORT/metrics (0 = off)."),
        option("--metrics-host", env="METRICS_HOST", default="127.0.0.1",
               help="Address the metrics listen on; 0.0.0.0 for a Prometheus on another machine (they name "
               "every volunteer: keep them off the open internet)."),
        option("--dashboard", "dashboard_port", env="DASHBOARD", type=click.IntRange(0, 65535), default=0,
               metavar="PORT", help="Serve the live web dashboard on http://HOST:PORT/ (eval loss, "
               "volunteers, credit, queue, rejections; 0 = off)."),
        option("--dashboard-host", env="DASHBOARD_HOST", default="127.0.0.1",
               help="Address the dashboard listens on. It has no login and names every volunteer: keep "
               "127.0.0.1 and reach it through an SSH tunnel (ssh -L PORT:127.0.0.1:PORT HOST)."),
    )


def round_options() -> Callable[[F], F]:
    """Round sizes (Dynamic Local Updates), the grace period and the warm start: --local-steps,
    --min-local-steps, --grace-rounds, --warm-start-steps."""
    return _group(
        option("--local-steps", env="LOCAL_STEPS", type=click.IntRange(1), default=30,
               help="H: local steps per round of the fastest client."),
        option("--min-local-steps", env="MIN_LOCAL_STEPS", type=click.IntRange(1), default=5,
               help="H_min: the shortest round DyLU assigns (5, as in every run of the parity table in "
               "docs/BENCHMARKS.md)."),
        option("--grace-rounds", env="GRACE_ROUNDS", type=click.FloatRange(0, 4), default=0.25,
               help="A client whose delta did not close the outer buffer's cycle waits up to this many "
               "rounds of the fastest client for the cycle's momentum step before its next round "
               "(0 = start at once; 0.25 brought equal-speed clients within 1% of sync per update: "
               "docs/BENCHMARKS.md)."),
        option("--warm-start-steps", env="WARM_START_STEPS", type=click.IntRange(0), default=0,
               help="Train the first this many local steps as one client alone (ordinary training), "
               "then asynchronously (0 = off)."),
    )


def task_options(*, model_size: str | None, data: str | None) -> Callable[[F], F]:
    """The built-in task and the seed: --model-size, --data, --seed.

    ``model_size`` and ``data`` are the defaults. ``serve`` passes None, so that an unset option
    leaves the value to ``--task-setting`` or, failing that, to the task (tiny, stdlib);
    ``simulate`` passes ``"tiny"`` and ``"stdlib"``, which it hands to the task as they are.
    """
    size_help = ("Size of the built-in byte-level LM: tiny 0.45M, small 4.9M, medium 25M, large 100M "
                 "parameters" + (" [default: tiny]." if model_size is None else "."))
    data_help = "Corpus: 'stdlib' (this Python's own sources) or a glob of text files" + (
        " [default: stdlib]." if data is None else "."
    )
    return _group(
        option("--model-size", env="MODEL_SIZE", type=click.Choice(list(MODEL_SIZES)), default=model_size,
               help=size_help),
        option("--data", env="DATA", default=data, help=data_help),
        option("--seed", env="SEED", type=int, default=0,
               help="Seed of the initial model (simulate: also of speeds, churn and data order)."),
    )


def threads_option(*, default: int | None) -> Callable[[F], F]:
    """--threads: torch CPU threads. ``default`` None (``serve``) leaves torch's own choice."""
    return option("--threads", env="THREADS", type=click.IntRange(1), default=default,
                  help="torch CPU threads" + (" [default: torch's choice]." if default is None else "."))


def tls_option() -> Callable[[F], F]:
    """--tls-ca (as ``tls_ca``): the CAs that ``rediss://`` and ``amqps://`` servers are checked against.

    Checked (a readable PEM bundle) by :class:`~shared.settings.ConnectionSettings`, its one home.
    """
    return option("--tls-ca", "tls_ca", env="TLS_CA", metavar="FILE", default=None,
                  help="PEM bundle of the CA that signed the servers' TLS certificates, trusted besides "
                  "the system's CAs for rediss:// and amqps:// URLs (TLS is required by using those).")


def server_options(*, amqp_help: str = "RabbitMQ URL; for a RabbitMQ cluster, several nodes' URLs "
                   "separated by commas (same user and virtual host), tried in order on every "
                   "(re)connect.") -> Callable[[F], F]:
    """Where the servers are: --redis and --amqp (as ``redis_url`` and ``amqp_url``)."""
    return _group(
        option("--redis", "redis_url", env="REDIS", default=DEFAULT_REDIS_URL,
               help="Redis URL (rediss:// for TLS; redis+cluster://ANY_NODE:PORT/0 for a Redis Cluster)."),
        option("--amqp", "amqp_url", env="AMQP", default=DEFAULT_AMQP_URL, help=amqp_help),
    )


def checkpoint_dir_option() -> Callable[[F], F]:
    """``--checkpoint-dir`` of the commands that read a run's directory (key, export, sample)."""
    return option("--checkpoint-dir", env="CHECKPOINT_DIR", type=click.Path(file_okay=False, path_type=Path),
                  default=None,
                  help="The run's checkpoint directory [default: ~/.local/state/asyncloco/coordinator/RUN].")


def run_checkpoint_dir(run: str, checkpoint_dir: Path | None) -> Path:
    """``--checkpoint-dir``, else the run's own directory under the state dir: where ``serve`` keeps
    the checkpoint, and ``invite``, ``revoke``, ``volunteers`` and ``key`` find the book and key."""
    validate_run_name(run)  # before it becomes part of a path
    return checkpoint_dir if checkpoint_dir is not None else default_state_dir() / "coordinator" / run


def signing_key_path(signing_key: Path | None, checkpoint_dir: Path | None, run: str) -> Path:
    """``--signing-key``, else the key file in the run's checkpoint directory (as ``serve`` picks it)."""
    return signing_key if signing_key is not None else run_checkpoint_dir(run, checkpoint_dir) / KEY_FILE_NAME
