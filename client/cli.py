"""``asyncloco-client``: the volunteer's command line.

Every option can also be set through its ``ASYNCLOCO_*`` environment variable. Errors end as one
line on stderr: exit code 1 for an asyncloco error (bad setting, task, snapshot), 2 for a usage
error; a second Ctrl-C exits at once with 130.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click

from client.config import DEVICES, LOG_LEVELS, ClientConfig
from client.stop import StopSignals
from shared.cli import OneLineErrors
from shared.codecs import CODECS
from shared.files import append_line_durably, default_state_dir
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, ConnectionSettings


def _err(text: str) -> None:
    click.echo(text, err=True)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
def main() -> None:
    """asyncloco volunteer client: lend this machine to an asyncloco training run.

    It needs outbound access to the run's Redis and RabbitMQ, nothing else; start with
    `asyncloco-client join --run NAME`.
    """


def _setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if level > logging.DEBUG:
        # pika logs a multi-line story for every failed connect; our own warning line says enough.
        logging.getLogger("pika").setLevel(logging.CRITICAL)


def _option(*decls: str, env: str, **kwargs: Any) -> Any:
    """A click option read from ``--flag`` or, failing that, the environment variable ``env``."""
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


@main.command()
@_option("--run", env="ASYNCLOCO_RUN", default="default", show_default=True, metavar="NAME",
         help="Name of the training run to join.")
@_option("--redis", "redis_url", env="ASYNCLOCO_REDIS", default=DEFAULT_REDIS_URL, show_default=True,
         metavar="URL", help="Redis where the coordinator publishes snapshots.")
@_option("--amqp", "amqp_url", env="ASYNCLOCO_AMQP", default=DEFAULT_AMQP_URL, show_default=True,
         metavar="URL", help="RabbitMQ that deltas are sent to.")
@_option("--data", env="ASYNCLOCO_DATA", default=None, metavar="GLOB",
         help="Train on these text files instead of the run's corpus (e.g. '~/notes/**/*.md').")
@_option("--device", env="ASYNCLOCO_DEVICE", default="auto", show_default=True,
         type=click.Choice(DEVICES, case_sensitive=False),
         help="Where to train; auto picks CUDA, then Apple MPS, then the CPU.")
@_option("--codec", env="ASYNCLOCO_CODEC", default="fp16", show_default=True,
         type=click.Choice(sorted(CODECS), case_sensitive=False),
         help="Delta compression; int8 sends ~4x less than fp32 (the error is fed into the next round).")
@_option("--slowdown", env="ASYNCLOCO_SLOWDOWN", default=1.0, show_default=True,
         type=click.FloatRange(min=1.0), metavar="X", help="Emulate hardware X times slower (demos, tests).")
@_option("--client-id", env="ASYNCLOCO_CLIENT_ID", default=None, metavar="ID",
         help="Stable id of this client (1-64 of A-Z a-z 0-9 _ . -) [default: generated once, kept in the "
              "state dir].")
@_option("--state-dir", env="ASYNCLOCO_STATE_DIR", default=None, metavar="DIR",
         type=click.Path(file_okay=False, path_type=Path),
         help=f"Client id and sequence numbers live here [default: {default_state_dir()}].")
@_option("--threads", env="ASYNCLOCO_THREADS", default=None, type=click.IntRange(min=1), metavar="N",
         help="CPU threads for torch [default: half the cores].")
@_option("--max-rounds", env="ASYNCLOCO_MAX_ROUNDS", default=0, show_default=True,
         type=click.IntRange(min=0), metavar="N", help="Stop after this many rounds (0: run until stopped).")
@_option("--max-seconds", env="ASYNCLOCO_MAX_SECONDS", default=0.0, show_default=True,
         type=click.FloatRange(min=0.0), metavar="SECONDS",
         help="Stop after this long, sending the round in hand (0: no limit).")
@_option("--part-bytes", env="ASYNCLOCO_PART_BYTES", default=8 * 1024 * 1024, show_default=True,
         type=click.IntRange(min=1), metavar="BYTES",
         help="Send a delta bigger than this in parts of this size (keep it under the broker's message "
              "limit).")
@_option("--log-level", env="ASYNCLOCO_LOG_LEVEL", default="warning", show_default=True,
         type=click.Choice(LOG_LEVELS, case_sensitive=False), help="Logging detail on stderr.")
@_option("--journal", env="ASYNCLOCO_JOURNAL", default=None, hidden=True,
         type=click.Path(dir_okay=False, path_type=Path),
         help="Fault tests only: append each broker-confirmed delta id (client_id:seq) to this file.")
def join(
    run: str,
    redis_url: str,
    amqp_url: str,
    data: str | None,
    device: str,
    codec: str,
    slowdown: float,
    client_id: str | None,
    state_dir: Path | None,
    threads: int | None,
    max_rounds: int,
    max_seconds: float,
    part_bytes: int,
    log_level: str,
    journal: Path | None,
) -> None:
    """Join a run and train rounds until stopped (Ctrl-C sends the round in hand, then exits).

    Each round prints one line: the snapshot version it started from (v), local steps run (H),
    mean training loss, throughput, bytes sent and staleness (versions published meanwhile).
    If staleness is often high, this machine is slow for the run: that is fine, Dynamic Local
    Updates keeps its rounds short, and the coordinator discards only deltas more than its
    --max-staleness versions behind; --codec int8 helps when the upload is the bottleneck.
    """
    config = ClientConfig(
        run=run,
        connection=ConnectionSettings(redis_url=redis_url, amqp_url=amqp_url),
        data=data,
        device=device.lower(),
        codec=codec.lower(),
        slowdown=slowdown,
        client_id=client_id,
        state_dir=state_dir if state_dir is not None else default_state_dir(),
        threads=threads if threads is not None else max(1, (os.cpu_count() or 2) // 2),
        max_rounds=max_rounds,
        max_seconds=max_seconds,
        part_bytes=part_bytes,
        log_level=log_level.lower(),
    )
    _setup_logging(config.logging_level)
    stop = threading.Event()
    signals = StopSignals(stop, on_first=_err).install()
    from client.worker import Worker  # torch is imported here, after the options are known good

    # The fault tests' half of the durability oracle: every delta the broker confirmed, fsynced.
    on_confirmed = None if journal is None else functools.partial(append_line_durably, journal)
    try:
        with Worker(config, stop=stop, on_notice=click.echo, on_confirmed=on_confirmed) as worker:
            summary = worker.run(on_round=lambda report: click.echo(report.line()))
    finally:
        signals.restore()
    click.echo(summary.line())


if __name__ == "__main__":
    main()
