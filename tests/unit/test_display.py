"""What the volunteer sees: plain lines off a terminal (as before the display), the live panel on
one, fed by the worker's events; which of the two is chosen."""

from __future__ import annotations

import dataclasses
import io
import logging

import pytest
from rich.console import Console

from client.contribution import Contribution
from client.display import LiveDisplay, PanelState, PlainDisplay, make_display, render_panel, wants_live
from client.events import RoundStart
from client.report import DeltaFate, RoundReport
from shared.local_round import StepProgress
from shared.verdict import Verdict

START = RoundStart(round=3, run="demo", run_id="rid-1", client_id="c-abc", base_version=12, planned_steps=100)


def report(verdict: Verdict | None, *, sent: bool = True) -> RoundReport:
    return RoundReport(round=3, seq=7, base_version=12, planned_steps=100, steps=100, train_loss=2.25,
                       compute_s=10.0, tokens=50_000, sent_bytes=3_000_000, sent=sent, upload_s=0.2,
                       staleness=1, fate=DeltaFate(verdict, 13 if verdict else None), run="demo",
                       run_id="rid-1")


def text_of(state: PanelState, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(render_panel(state))
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("plain", "isatty", "term", "live"), [
    (False, True, "xterm-256color", True),
    (False, True, None, True),  # Windows terminals set no TERM
    (True, True, "xterm", False),  # --plain / ASYNCLOCO_PLAIN
    (False, False, "xterm", False),  # a pipe, a file, systemd's journal
    (False, True, "dumb", False),  # cannot redraw
])
def test_the_live_panel_only_on_a_terminal_that_can_redraw(
    plain: bool, isatty: bool, term: str | None, live: bool
) -> None:
    assert wants_live(plain=plain, isatty=isatty, term=term) is live
    display = make_display(plain=plain, write=print, isatty=isatty, term=term)
    assert isinstance(display, LiveDisplay if live else PlainDisplay)


def test_plain_lines_are_the_notices_and_the_round_lines() -> None:
    lines: list[str] = []
    with PlainDisplay(lines.append) as display:
        display.notice("waiting for the coordinator")
        display.round_started(START)
        display.step(StepProgress(steps=30, max_steps=100, tokens=15_000, elapsed_s=3.0, loss=2.5))
        display.paused("on battery")
        display.contribution(Contribution())
        display.round_finished(report(Verdict("rid-1", 7, True)))
    assert display.log_handler() is None  # logging stays on stderr
    assert lines == ["waiting for the coordinator", report(Verdict("rid-1", 7, True)).line()]


def test_the_panel_shows_the_round_in_progress() -> None:
    state = PanelState()
    state.started(START)
    state.progressed(StepProgress(steps=30, max_steps=100, tokens=15_000, elapsed_s=3.0, loss=2.3456))
    text = text_of(state)
    assert "asyncloco · run demo · client c-abc" in text
    assert "training round 3" in text and "30/100 steps" in text
    assert "v12" in text and "2.346" in text and "5,000" in text  # tokens/s: 15000 / 3 s
    assert "0 rounds, 0 local steps" in text and "0 applied, 0 rejected" in text
    assert "this machine" not in text  # nothing recorded yet


def test_the_panel_counts_finished_rounds_and_the_lifetime() -> None:
    state = PanelState()
    state.started(START)
    state.finished(report(Verdict("rid-1", 7, True)))
    state.started(START)
    state.finished(report(Verdict("rid-1", 8, False, "stale", "too old")))
    state.finished(report(None, sent=False))
    lifetime = Contribution()
    for n in range(4):
        lifetime = lifetime.plus(report(Verdict("rid-1", n, True)), 1_717_400_000.0 + n)
    state.lifetime = lifetime
    text = text_of(state, width=160)
    assert "3 rounds, 300 local steps, 150.0k tokens" in text
    assert "sent 6.0MB, received 0B" in text  # the unsent delta sent nothing
    assert "1 applied, 1 rejected  (last: round 3: not sent)" in text
    assert "4 rounds, 0.7 min, 200.0k tokens, 4 applied (all runs)" in text  # 4 x 10 s


def test_the_panel_says_where_the_last_rounds_time_went() -> None:
    state = PanelState()
    state.started(START)
    assert "last round" not in text_of(state)  # none finished yet
    timed = dataclasses.replace(report(Verdict("rid-1", 7, True)), fetch_s=0.5, encode_s=0.25, wait_s=1.75)
    state.finished(timed)
    assert ("last round    fetch 0.50s, compute 10.00s, encode 0.25s, upload 0.20s, wait 1.75s"
            in text_of(state, width=160))
    assert "fetch=0.50s encode=0.25s upload=0.20s wait=1.75s  staleness=1  applied v=13" in timed.line()


def test_the_live_display_redraws_the_panel_with_lines_above_it() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    display = LiveDisplay(console)
    handler = display.log_handler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test_display.live")
    logger.addHandler(handler)
    try:
        with display:
            display.started("demo", "c-abc")
            display.paused("on battery")
            before = text_of(display.state)  # before any round: the title already says who
            display.notice("joined run 'demo'")
            display.round_started(START)
            display.step(StepProgress(steps=50, max_steps=100, tokens=25_000, elapsed_s=5.0, loss=2.0))
            display.snapshot_read(12, 4_000_000)
            logger.warning("Redis unavailable")
            display.sending(2_500_000)
            display.round_finished(report(Verdict("rid-1", 7, True)))
            display.paused("outside --schedule 'sat-sun'")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "asyncloco · run demo · client c-abc" in before and "paused: on battery" in before
    assert "joined run 'demo'" in text and "WARNING Redis unavailable" in text
    assert report(Verdict("rid-1", 7, True)).line() in text
    final = text[text.rindex("asyncloco · run demo"):]  # the last panel drawn stays on screen
    assert "paused: outside --schedule 'sat-sun'" in final
    assert "received 4.0MB" in final and "1 applied, 0 rejected" in final


def test_the_panel_says_why_a_round_was_abandoned_and_drops_its_progress() -> None:
    display = LiveDisplay(Console(file=io.StringIO(), width=160, color_system=None))
    display.round_started(START)
    display.step(StepProgress(steps=30, max_steps=100, tokens=15_000, elapsed_s=3.0, loss=2.5))
    display.abandoned("this client uses 5.00 GB of memory, over --max-memory 4 GB")
    text = text_of(display.state, width=160)
    assert "round 3 abandoned: this client uses 5.00 GB of memory, over --max-memory 4 GB" in text
    assert "30/100 steps" not in text  # its progress was thrown away
    display.paused("the machine is in use (keyboard, mouse or terminal input 42 s ago, within "
                   "--idle-after 5 min)")
    assert "paused: the machine is in use (keyboard, mouse or terminal input 42 s ago" in text_of(
        display.state, width=160)


def test_a_second_ctrl_c_gets_the_cursor_back_that_the_live_panel_hid() -> None:
    out = io.StringIO()
    display = LiveDisplay(Console(file=out, force_terminal=True, width=80, color_system=None))
    with display:
        assert "\x1b[?25l" in out.getvalue()  # hidden while the panel redraws
        mark = len(out.getvalue())
        display.restore_terminal()  # what StopSignals calls before os._exit
        assert "\x1b[?25h" in out.getvalue()[mark:]


def test_an_error_takes_the_panel_away_so_that_its_line_stands_alone() -> None:
    out = io.StringIO()
    display = LiveDisplay(Console(file=out, force_terminal=True, width=80, color_system=None))
    with pytest.raises(RuntimeError), display:
        display.live.refresh()
        raise RuntimeError("refused")
    assert display.live.transient and out.getvalue().endswith("\x1b[2K")  # the panel's lines erased
