"""What the volunteer sees: a live panel on a terminal, plain lines anywhere else.

On a terminal (stdout a TTY, ``TERM`` not ``dumb``, neither ``--plain`` nor ``ASYNCLOCO_PLAIN``)
:class:`LiveDisplay` keeps one panel up to date: progress within the round (steps done of those
planned), the snapshot version, tokens/s, loss, this process's local steps, bytes sent and
received, deltas applied and rejected, where the last round's time went (fetch, compute, encode,
upload, wait on the coordinator), and this machine's lifetime contribution (from
:mod:`client.contribution`). Notices, log records and each round's line scroll above the panel.
Anywhere else (systemd's journal, a pipe, a file, a test) :class:`PlainDisplay` prints the plain
lines: the notices and one line per round, exactly as without a display.

The panel is drawn with rich (Textualize/rich): actively maintained and widely used, pure Python
(no curses: the same on Linux, macOS and Windows terminals), and its ``Live`` view redraws in
place while other output scrolls above it, which is what a long-running client needs.

A display is a :class:`~client.events.WorkerEvents` (progress within rounds, pauses) plus the
two callbacks the worker already had: :meth:`Display.notice` and :meth:`Display.round_finished`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from client.contribution import Contribution, compute_time, si_prefixed
from client.events import RoundStart, WorkerEvents
from client.report import RoundReport

if TYPE_CHECKING:  # torch comes with it: the CLI builds the display before it imports torch
    from shared.local_round import StepProgress

REFRESH_PER_S = 4.0


class Display(WorkerEvents):
    """The volunteer's view of a running client; use it as a context manager around the run."""

    def notice(self, text: str) -> None:
        """A one-line notice for the user ("waiting for ...", "paused: ...")."""

    def round_finished(self, report: RoundReport) -> None:
        """A round ended (its delta sent and judged, as far as the client waited)."""

    def contribution(self, lifetime: Contribution) -> None:
        """This machine's lifetime contribution, after each round is recorded."""

    def log_handler(self) -> logging.Handler | None:
        """Where log records must go while the display runs (None: stderr as usual)."""
        return None

    def restore_terminal(self) -> None:
        """Leave the terminal usable before an immediate exit (a second Ctrl-C)."""

    def __enter__(self) -> Display:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        return None


class PlainDisplay(Display):
    """Plain lines through ``write`` (``click.echo``): the notices and one line per round."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def notice(self, text: str) -> None:
        self.write(text)

    def round_finished(self, report: RoundReport) -> None:
        self.write(report.line())


@dataclass
class PanelState:
    """What the panel shows; the events update it, :func:`render_panel` draws it."""

    run: str = ""
    client_id: str = ""
    status: str = "connecting"
    round: int = 0
    version: int | None = None
    steps: int = 0  # done in the round in hand
    planned: int = 0
    tokens_per_s: float | None = None
    loss: float | None = None
    rounds: int = 0  # finished by this process
    local_steps: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    applied: int = 0
    rejected: int = 0
    last_fate: str = ""
    last_round_s: str = ""  # where the last finished round's time went
    lifetime: Contribution | None = None

    def started(self, start: RoundStart) -> None:
        self.run, self.client_id, self.round = start.run, start.client_id, start.round
        self.version, self.steps, self.planned = start.base_version, 0, start.planned_steps
        self.status = f"training round {start.round}"

    def progressed(self, progress: StepProgress) -> None:
        self.steps, self.planned = progress.steps, progress.max_steps
        self.loss = progress.loss if math.isfinite(progress.loss) else self.loss
        if progress.elapsed_s > 0:
            self.tokens_per_s = progress.tokens / progress.elapsed_s

    def finished(self, report: RoundReport) -> None:
        verdict = report.fate.verdict
        self.rounds += 1
        self.local_steps += report.steps
        self.tokens += report.tokens
        self.bytes_up += report.sent_bytes if report.sent else 0
        self.applied += int(verdict is not None and verdict.applied)
        self.rejected += int(verdict is not None and not verdict.applied)
        self.last_fate = f"round {report.round}: " + (report.fate.describe() if report.sent else "not sent")
        self.steps, self.tokens_per_s = report.steps, report.tokens_per_s
        self.loss = report.train_loss if math.isfinite(report.train_loss) else self.loss
        self.status = "waiting for the next round"
        self.last_round_s = (f"fetch {report.fetch_s:.2f}s, compute {report.compute_s:.2f}s, "
                             f"encode {report.encode_s:.2f}s, upload {report.upload_s:.2f}s, "
                             f"wait {report.wait_s:.2f}s")


def render_panel(state: PanelState) -> Panel:
    """The panel for ``state``: one row per figure, the round's progress as a bar."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("status", state.status)
    if state.planned:
        row = Table.grid(padding=(0, 1))
        row.add_row(ProgressBar(total=state.planned, completed=min(state.steps, state.planned), width=30),
                    f"{state.steps}/{state.planned} steps")
        grid.add_row("round", row)
    grid.add_row("version", "-" if state.version is None else f"v{state.version}")
    grid.add_row("loss", "-" if state.loss is None else f"{state.loss:.3f}")
    grid.add_row("tokens/s", "-" if state.tokens_per_s is None else f"{state.tokens_per_s:,.0f}")
    grid.add_row("this process", f"{state.rounds} rounds, {state.local_steps:,} local steps, "
                                 f"{si_prefixed(state.tokens)} tokens")
    grid.add_row("traffic", f"sent {si_prefixed(state.bytes_up)}B, received {si_prefixed(state.bytes_down)}B")
    grid.add_row("deltas", f"{state.applied} applied, {state.rejected} rejected"
                           + (f"  (last: {state.last_fate})" if state.last_fate else ""))
    if state.last_round_s:
        grid.add_row("last round", state.last_round_s)
    if state.lifetime is not None and state.lifetime.first_seen is not None:
        total = state.lifetime.total
        grid.add_row("this machine", f"{total.rounds} rounds, {compute_time(total.compute_s)}, "
                                     f"{si_prefixed(total.tokens)} tokens, {total.applied} applied "
                                     "(all runs)")
    title = "asyncloco" + (f" · run {state.run}" if state.run else "") + (
        f" · client {state.client_id}" if state.client_id else "")
    return Panel(grid, title=title, title_align="left", expand=False)


class _ConsoleHandler(logging.Handler):
    """Log records printed above the live panel instead of through it."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record)), soft_wrap=True)
        except Exception:  # a log record must never stop the client
            self.handleError(record)


class LiveDisplay(Display):
    """The live panel on ``console`` (a terminal), redrawn ``REFRESH_PER_S`` times a second."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.state = PanelState()
        self.live = Live(console=console, get_renderable=self.render, refresh_per_second=REFRESH_PER_S)

    def render(self) -> RenderableType:
        return render_panel(self.state)

    def __enter__(self) -> LiveDisplay:
        self.live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        # The last panel stays on screen, unless an error ends the client: then its line stands alone.
        self.live.transient = kind is not None
        self.live.stop()

    def _print(self, text: str) -> None:
        self.console.print(Text(text), soft_wrap=True)

    def notice(self, text: str) -> None:
        self._print(text)

    def round_finished(self, report: RoundReport) -> None:
        self.state.finished(report)
        self._print(report.line())

    def contribution(self, lifetime: Contribution) -> None:
        self.state.lifetime = lifetime

    def log_handler(self) -> logging.Handler:
        return _ConsoleHandler(self.console)

    def restore_terminal(self) -> None:
        self.console.show_cursor(True)  # Live hid it; os._exit leaves no chance to stop() it

    def started(self, run: str, client_id: str) -> None:
        self.state.run, self.state.client_id = run, client_id

    def round_started(self, start: RoundStart) -> None:
        self.state.started(start)

    def step(self, progress: StepProgress) -> None:
        self.state.progressed(progress)

    def snapshot_read(self, version: int, nbytes: int) -> None:
        self.state.bytes_down += nbytes
        self.state.version = version

    def sending(self, nbytes: int) -> None:
        self.state.status = (f"round {self.state.round}: sending its delta ({si_prefixed(nbytes)}B), then "
                             "awaiting the verdict")

    def paused(self, reason: str) -> None:
        self.state.status = f"paused: {reason}"
        self.state.planned = 0  # the round in hand was abandoned

    def resumed(self, paused_s: float) -> None:
        self.state.status = "resuming"

    def abandoned(self, reason: str) -> None:
        self.state.status = f"round {self.state.round} abandoned: {reason}"
        self.state.planned = 0


def wants_live(*, plain: bool, isatty: bool, term: str | None) -> bool:
    """The live panel only on a terminal that can redraw, and only when not asked for plain lines."""
    return not plain and isatty and (term or "").lower() != "dumb"


def make_display(*, plain: bool, write: Callable[[str], None], isatty: bool, term: str | None) -> Display:
    """A :class:`LiveDisplay` on stdout if :func:`wants_live`, else a :class:`PlainDisplay` on ``write``."""
    if wants_live(plain=plain, isatty=isatty, term=term):
        return LiveDisplay(Console())
    return PlainDisplay(write)
