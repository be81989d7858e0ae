"""``asyncloco-client``: the volunteer's command line.

Every option can also be set through its ``ASYNCLOCO_*`` environment variable. Errors end as one
line on stderr, with an exit code that says what kind of error it was:

==  =======================================================================================
0   stopped as asked (``--max-rounds``, ``--max-seconds``, ``--max-hours``, Ctrl-C or SIGTERM)
1   an asyncloco error: a bad setting, task or snapshot; a refused TLS certificate
2   a usage error (a bad option or value)
66  no such run: nothing of it appeared in Redis within ``--run-wait`` (a mistyped run name)
67  revoked: a server refuses the credentials that it accepted earlier in this process
68  unknown host: a server's host name does not resolve (checked at first contact)
69  nothing listens at a server's address, or another kind of server does (at first contact)
76  protocol mismatch: the coordinator speaks another protocol version (the line says which
    side to upgrade), for ``--run-wait``
77  access refused: a wrong user or password, none given, or no permission for the run
130 a second Ctrl-C (exits at once)
==  =======================================================================================

66-77 are permanent: restarting cannot cure them (the systemd unit in deploy/ does not restart
on them: ``RestartPreventExitStatus=``). A server that was reachable and goes away is an outage:
the client retries it with capped backoff for as long as it takes, and says so at WARNING, the
default log level, when it goes and when it comes back. ``--version`` prints the package's
version and the protocol version.

On a terminal ``join`` shows a live panel (:mod:`client.display`); elsewhere, or with ``--plain``,
the plain lines. ``--schedule``, ``--idle-only`` and being on battery pause it
(:mod:`client.politeness`); ``--max-memory`` and ``--max-gpu-memory`` cap its memory
(:mod:`client.memory_caps`). ``stats`` prints this machine's lifetime contribution
(:mod:`client.contribution`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from client.config import DEVICES, LOG_LEVELS, ClientConfig
from client.contribution import ContributionBook
from client.credentials import Joined, merge, read_token, snapshot_source
from client.memory_caps import GIB, MemoryCaps
from client.politeness import PolitenessConfig, Schedule, ScheduleError
from client.report import RoundReport
from client.stop import StopSignals
from shared.cli import OneLineErrors, version_option
from shared.codecs import CODECS
from shared.errors import ConfigError
from shared.files import append_line_durably, default_state_dir
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, ConnectionSettings


def _err(text: str) -> None:
    click.echo(text, err=True)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
@version_option()
def main() -> None:
    """asyncloco volunteer client: lend this machine to an asyncloco training run.

    It needs outbound access to the run's Redis and RabbitMQ, nothing else; start with
    `asyncloco-client join --run NAME`.

    Exit codes: 0 stopped as asked, 1 error, 2 usage error; and for mistakes that restarting
    cannot cure: 66 no such run, 67 invitation revoked, 68 unknown host, 69 nothing listening
    (wrong port), 76 protocol mismatch, 77 wrong credentials. Outages are retried, not exits.
    """


def _setup_logging(level: int, handler: logging.Handler | None = None) -> None:
    """Log records at ``level`` and above to stderr, or to ``handler`` (the live display's)."""
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if handler is None:
        logging.basicConfig(level=level, stream=sys.stderr, format=log_format)
    else:
        handler.setFormatter(logging.Formatter(log_format))
        logging.basicConfig(level=level, handlers=[handler])
    if level > logging.DEBUG:
        # pika logs a multi-line story for every failed connect; our own warning line says enough.
        logging.getLogger("pika").setLevel(logging.CRITICAL)


def _split_tasks(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--allow-task`` values, each of which may list several tasks separated by commas."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


def _option(*decls: str, env: str, **kwargs: Any) -> Any:
    """A click option read from ``--flag`` or, failing that, the environment variable ``env``."""
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


def _schedule(ctx: click.Context, param: click.Parameter, value: str | None) -> Schedule | None:
    """``--schedule`` read into a :class:`Schedule`; a bad one is a usage error of one line."""
    if value is None:
        return None
    try:
        return Schedule.parse(value)
    except ScheduleError as exc:
        raise click.BadParameter(str(exc)) from None


def _state_dir_option() -> Any:
    return _option("--state-dir", env="ASYNCLOCO_STATE_DIR", default=None, metavar="DIR",
                   type=click.Path(file_okay=False, path_type=Path),
                   help=f"Client id, sequence numbers and this machine's contribution live here "
                        f"[default: {default_state_dir()}].")


@main.command()
@click.argument("token", required=False, envvar="ASYNCLOCO_TOKEN")
@_option("--token-file", env="ASYNCLOCO_TOKEN_FILE", default=None, metavar="FILE",
         type=click.Path(dir_okay=False, path_type=Path),
         help="Read the join token from this file (mode 0600) instead: it stays out of `ps`.")
@_option("--run", env="ASYNCLOCO_RUN", default=None, metavar="NAME",
         help="Name of the training run to join [default: the token's, else 'default'].")
@_option("--redis", "redis_url", env="ASYNCLOCO_REDIS", default=None,
         metavar="URL", help=f"Redis where the coordinator publishes snapshots (redis+cluster:// for a Redis "
         f"Cluster) [default: the token's, else {DEFAULT_REDIS_URL}].")
@_option("--snapshot-url", env="ASYNCLOCO_SNAPSHOT_URL", default=None, metavar="URL",
         help="Read snapshots (and plan, verdicts) from this read-only replica of the run's Redis instead: "
              "they are signed, so a replica is as safe. Without a user or database in it, the token's "
              "(or --redis's) are used.")
@_option("--amqp", "amqp_url", env="ASYNCLOCO_AMQP", default=None,
         metavar="URL", help="RabbitMQ that deltas are sent to; for a RabbitMQ cluster, several nodes' "
         "URLs separated by commas (same user and virtual host), tried in order on every (re)connect "
         "[default: the token's, else amqp://guest:guest@127.0.0.1:5672/%2F].")
@_option("--tls-ca", "tls_ca", env="ASYNCLOCO_TLS_CA", default=None, metavar="FILE",
         help="PEM bundle of the CA that signed the servers' TLS certificates (from the run's operator), "
              "trusted besides the system's CAs for rediss:// and amqps:// URLs.")
@_option("--data", env="ASYNCLOCO_DATA", default=None, metavar="GLOB",
         help="Train on these text files instead of the run's corpus (e.g. '~/notes/**/*.md').")
@_option("--device", env="ASYNCLOCO_DEVICE", default="auto", show_default=True,
         metavar="|".join([*DEVICES, "cuda:N"]),
         help="Where to train; auto picks CUDA, then Apple MPS, then the CPU; cuda:N one GPU of several. "
         "On CUDA the round runs bf16 autocast (where the GPU has it), TF32 and the fused AdamW, and the "
         "delta is quantised on the GPU.")
@_option("--codec", env="ASYNCLOCO_CODEC", default="int3", show_default=True,
         type=click.Choice(sorted(CODECS), case_sensitive=False),
         help="Delta compression (the error is fed into the next round): int3 sends ~10x less than fp32 "
         "(within 0.01% of fp32's eval loss over 3 seeds in docs/BENCHMARKS.md), int8 ~4x, int4 ~7.5x, "
         "fp16 2x, topk ~40x (10% worse there).")
@_option("--slowdown", env="ASYNCLOCO_SLOWDOWN", default=1.0, show_default=True,
         type=click.FloatRange(min=1.0), metavar="X", help="Emulate hardware X times slower (demos, tests).")
@_option("--client-id", env="ASYNCLOCO_CLIENT_ID", default=None, metavar="ID",
         help="Stable id of this client (1-64 of A-Z a-z 0-9 _ . -) [default: generated once, kept in the "
              "state dir].")
@_state_dir_option()
@_option("--threads", env="ASYNCLOCO_THREADS", default=None, type=click.IntRange(min=1), metavar="N",
         help="CPU threads for torch [default: half the cores].")
@_option("--max-rounds", env="ASYNCLOCO_MAX_ROUNDS", default=0, show_default=True,
         type=click.IntRange(min=0), metavar="N", help="Stop after this many rounds (0: run until stopped).")
@_option("--max-seconds", env="ASYNCLOCO_MAX_SECONDS", default=0.0, show_default=True,
         type=click.FloatRange(min=0.0), metavar="SECONDS",
         help="Stop after this long, sending the round in hand (0: no limit).")
@_option("--max-hours", env="ASYNCLOCO_MAX_HOURS", default=0.0, show_default=True,
         type=click.FloatRange(min=0.0), metavar="HOURS",
         help="Stop (exit 0) once this process has trained this many hours, sending the round in hand; "
              "pauses and waits for the coordinator do not count (0: no limit).")
@_option("--schedule", env="ASYNCLOCO_SCHEDULE", default=None, metavar="WINDOWS", callback=_schedule,
         help="Train only within these weekly windows of local time, e.g. 'mon-fri 19:00-07:00, sat-sun' "
              "(windows separated by commas; days, hours or both; hours past midnight end the next "
              "day). Outside them the client pauses, dropping the round in hand, and resumes by itself.")
@_option("--idle-only", env="ASYNCLOCO_IDLE_ONLY", is_flag=True,
         help="Pause while the machine is in use: while other processes keep more than --idle-load "
              "cores busy (the 1-minute load average, this client's own share taken out); while a "
              "keyboard, mouse or terminal was used within --idle-after minutes (Linux: the times of "
              "/dev/input/event*, /dev/input/mice, /dev/pts/N and /dev/ttyN, and logind's idle hints "
              "through loginctl; on macOS, Windows or in a container input is unknown and never "
              "pauses); and while another process computes on an NVIDIA GPU (nvidia-smi, if on PATH).")
@_option("--idle-load", env="ASYNCLOCO_IDLE_LOAD", default=1.0, show_default=True,
         type=click.FloatRange(min=0.0, min_open=True), metavar="CORES",
         help="With --idle-only: busy cores besides this client that mean the machine is in use. If "
              "it pauses while nobody uses the machine, raise it.")
@_option("--idle-after", "idle_after_min", env="ASYNCLOCO_IDLE_AFTER", default=5.0, show_default=True,
         type=click.FloatRange(min=0.0, min_open=True), metavar="MINUTES",
         help="With --idle-only: minutes without keyboard, mouse or terminal input before the machine "
              "counts as idle (started by hand in a terminal, the client so waits that long after the "
              "last key pressed there).")
@_option("--max-memory", "max_memory_gb", env="ASYNCLOCO_MAX_MEMORY", default=0.0, show_default=True,
         type=click.FloatRange(min=0.0), metavar="GB",
         help="Abandon the round in hand (no delta sent; the next one starts at once) whenever this "
              "client's resident memory is over this many GB (of 2^30 bytes), checked between training "
              "steps. If every round ends so, the run's model or batch is too big for this cap: a "
              "smaller one (the run's operator's choice) or a higher cap is the fix (0: no cap).")
@_option("--max-gpu-memory", "max_gpu_fraction", env="ASYNCLOCO_MAX_GPU_MEMORY", default=0.0,
         show_default=True, type=click.FloatRange(min=0.0, max=1.0), metavar="FRACTION",
         help="On CUDA, let torch allocate at most this fraction of the GPU's memory (a step that needs "
              "more ends the client with CUDA's out-of-memory error: leave room for the run's model); "
              "ignored, with a warning, on the CPU or MPS (0: no cap).")
@_option("--run-on-battery", env="ASYNCLOCO_RUN_ON_BATTERY", is_flag=True,
         help="Keep training on battery power (by default a laptop pauses while unplugged; Linux).")
@_option("--plain", env="ASYNCLOCO_PLAIN", is_flag=True,
         help="Plain lines even on a terminal (the live panel is only ever shown on one).")
@_option("--part-bytes", env="ASYNCLOCO_PART_BYTES", default=8 * 1024 * 1024, show_default=True,
         type=click.IntRange(min=1), metavar="BYTES",
         help="Send a delta bigger than this in parts of this size (keep it under the broker's message "
              "limit).")
@_option("--include-wait", "include_wait_s", env="ASYNCLOCO_INCLUDE_WAIT", default=10.0, show_default=True,
         type=click.FloatRange(min=0.0), metavar="SECONDS",
         help="With --no-overlap: after a delta is confirmed, wait this long for a snapshot that "
              "includes it, then for any newer one before the next round (the coordinator takes one "
              "delta per base version); with --overlap, the most it waits for the verdicts of its "
              "deltas in flight. 0: never wait, and no overlap (rounds on an old base are then refused "
              "already_sent; fault tests use it to pile deltas up).")
@_option("--overlap/--no-overlap", env="ASYNCLOCO_OVERLAP", default=True, show_default=True,
         help="Start the next round as soon as a delta is confirmed, from the newest snapshot moved by "
              "this client's own deltas as the coordinator will move it, instead of waiting for a "
              "snapshot that includes them (asynchronous runs; each round's line then comes one round "
              "late, with its verdict).")
@_option("--follow/--no-follow", env="ASYNCLOCO_FOLLOW", default=True, show_default=True,
         help="Move the round in hand onto each newer snapshot while it trains (by the snapshot's "
              "patches; the round's progress is kept), so that its delta is based on a recent version.")
@_option("--run-wait", "run_wait_s", env="ASYNCLOCO_RUN_WAIT", default=60.0, show_default=True,
         type=click.FloatRange(min=0.0), metavar="SECONDS",
         help="Give up (exit 66) if nothing of the run appears in Redis within this long: a mistyped "
              "run name. Also how long a coordinator of another protocol version is waited out (exit "
              "76). 0: wait for ever (e.g. a client started before its run's coordinator).")
@_option("--log-level", env="ASYNCLOCO_LOG_LEVEL", default="warning", show_default=True,
         type=click.Choice(LOG_LEVELS, case_sensitive=False), help="Logging detail on stderr.")
@_option("--coordinator-key", env="ASYNCLOCO_COORDINATOR_KEY", default=None, metavar="HEX",
         help="The run's coordinator public key (64 hex digits; `asyncloco-coordinator key` prints it): "
              "every snapshot and plan not signed by it is refused [default: the join token's].")
@_option("--allow-task", "allow_task", env="ASYNCLOCO_ALLOW_TASK", multiple=True, metavar="PKG.MOD:FACTORY",
         callback=lambda ctx, param, value: _split_tasks(value),
         help="Also allow runs of this user task (code on this machine that a run may then import and "
              "run); repeatable, or comma-separated in the variable. 'bytelm' is always allowed.")
@_option("--journal", env="ASYNCLOCO_JOURNAL", default=None, hidden=True,
         type=click.Path(dir_okay=False, path_type=Path),
         help="Fault tests only: append each broker-confirmed delta id (client_id:seq) to this file.")
def join(
    token: str | None,
    token_file: Path | None,
    run: str | None,
    redis_url: str | None,
    snapshot_url: str | None,
    amqp_url: str | None,
    tls_ca: str | None,
    data: str | None,
    device: str,
    codec: str,
    slowdown: float,
    client_id: str | None,
    state_dir: Path | None,
    threads: int | None,
    max_rounds: int,
    max_seconds: float,
    max_hours: float,
    schedule: Schedule | None,
    idle_only: bool,
    idle_load: float,
    idle_after_min: float,
    max_memory_gb: float,
    max_gpu_fraction: float,
    run_on_battery: bool,
    plain: bool,
    part_bytes: int,
    include_wait_s: float,
    overlap: bool,
    follow: bool,
    run_wait_s: float,
    log_level: str,
    coordinator_key: str | None,
    allow_task: tuple[str, ...],
    journal: Path | None,
) -> None:
    """Join a run and train rounds until stopped (Ctrl-C sends the round in hand, then exits).

    TOKEN is the join token from the run's operator (`asyncloco-coordinator invite`); it says which
    run, which servers, and who you are. Prefer --token-file or $ASYNCLOCO_TOKEN: a token on the
    command line is visible to other users of this machine.

    Each round prints one line: the snapshot version it started from (v), local steps run (H),
    mean training loss, throughput, bytes sent, staleness (versions published meanwhile) and the
    coordinator's verdict: "applied v=N" (the first snapshot that includes it) or "rejected:
    REASON (why)". On a terminal a live panel below the lines shows the round in progress and
    the totals (--plain: lines only). Exit codes: see `asyncloco-client --help`.
    A polite guest: --schedule, --idle-only and (unless --run-on-battery) unplugging pause
    training, dropping the round in hand, and it resumes by itself; `asyncloco-client stats`
    shows what this machine has given so far.
    If staleness is often high, this machine is slow for the run: that is fine, Dynamic Local
    Updates keeps its rounds short, and the coordinator discards only deltas more than its
    --max-staleness applied deltas behind; --codec int8 helps when the upload is the bottleneck.
    """
    join_token = read_token(token, token_file)
    if join_token is not None:
        # With a token, only a URL typed on this command line replaces the token's: an
        # ASYNCLOCO_REDIS/AMQP left in the environment (a coordinator's, say) must not.
        ctx = click.get_current_context()
        redis_url, amqp_url = (
            url if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE else None
            for name, url in (("redis_url", redis_url), ("amqp_url", amqp_url))
        )
    joined = merge(join_token, run=run, redis_url=redis_url, amqp_url=amqp_url,
                   client_id=client_id,
                   coordinator_key=coordinator_key.strip().lower() if coordinator_key else None,
                   defaults=Joined(run="default", redis_url=DEFAULT_REDIS_URL, amqp_url=DEFAULT_AMQP_URL,
                                   client_id=None, coordinator_key=None))
    config = ClientConfig(
        run=joined.run,
        connection=ConnectionSettings(redis_url=snapshot_source(snapshot_url, joined.redis_url),
                                      amqp_url=joined.amqp_url, tls_ca_file=tls_ca),
        data=data,
        device=device.lower(),
        codec=codec.lower(),
        slowdown=slowdown,
        client_id=joined.client_id,
        state_dir=state_dir if state_dir is not None else default_state_dir(),
        threads=threads if threads is not None else max(1, (os.cpu_count() or 2) // 2),
        max_rounds=max_rounds,
        max_seconds=max_seconds,
        max_hours=max_hours,
        politeness=PolitenessConfig(schedule=schedule, pause_on_battery=not run_on_battery,
                                    idle_load=idle_load if idle_only else None,
                                    idle_after_s=idle_after_min * 60),
        memory=MemoryCaps(max_rss_bytes=int(max_memory_gb * GIB), max_gpu_fraction=max_gpu_fraction),
        part_bytes=part_bytes,
        include_wait_s=include_wait_s,
        overlap=overlap,
        follow=follow,
        run_wait_s=run_wait_s,
        log_level=log_level.lower(),
        coordinator_key=joined.coordinator_key or "",
        allowed_tasks=allow_task,
    )
    from client.display import make_display  # rich, only for join
    display = make_display(plain=plain, write=click.echo, isatty=sys.stdout.isatty(),
                           term=os.environ.get("TERM"))
    _setup_logging(config.logging_level, display.log_handler())
    book = ContributionBook(config.state_dir)
    try:
        display.contribution(book.read())
    except ConfigError:
        pass  # an unreadable record is set aside by the first round's record() (with a warning)

    def on_round(report: RoundReport) -> None:
        display.contribution(book.record(report))
        display.round_finished(report)

    stop = threading.Event()
    signals = StopSignals(stop, on_first=_err, on_second=display.restore_terminal).install()
    from client.worker import Worker  # torch is imported here, after the options are known good

    # The fault tests' half of the durability oracle: every delta the broker confirmed, fsynced.
    on_confirmed = None if journal is None else functools.partial(append_line_durably, journal)
    try:
        # The panel starts once the worker is built: a bad setting ends in its one line without one.
        with Worker(config, stop=stop, on_notice=display.notice, on_confirmed=on_confirmed,
                    events=display) as worker, display:
            summary = worker.run(on_round=on_round)
    finally:
        signals.restore()
    click.echo(summary.line())


@main.command()
@_state_dir_option()
@_option("--json", "as_json", env="ASYNCLOCO_STATS_JSON", is_flag=True,
         help="Print the record as JSON (as kept in the state dir; times in Unix seconds).")
def stats(state_dir: Path | None, as_json: bool) -> None:
    """This machine's lifetime contribution: rounds, deltas applied and rejected (by reason),
    local steps, tokens, compute hours, bytes sent and received, first and last seen; in total
    and per run.

    Every client that used this state dir counts here (it is kept in contribution.json there,
    updated after each round). What credits you in a run is the coordinator's own count
    (`asyncloco-coordinator volunteers`).
    """
    book = ContributionBook(state_dir if state_dir is not None else default_state_dir())
    contribution = book.read()
    if as_json:
        click.echo(json.dumps({"state_dir": str(book.state_dir), **contribution.to_json()}, indent=1))
        return
    for line in contribution.lines():
        click.echo(line)


if __name__ == "__main__":
    main()
