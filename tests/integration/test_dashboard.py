"""The operator's dashboard (``serve --dashboard``) of a real coordinator (in a thread) on the real
servers: ``/api/status`` is the document ``status --json`` prints; the page, run by a real headless
Chromium, shows its numbers; the server answers GET of its own paths, to loopback names only, and
stops with the coordinator; ``serve`` takes the options and says in one line when the port is taken.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import coordinator.cli as cli
from coordinator.config import DashboardConfig
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.protocol import DeltaMessage
from tests.integration.test_operator_view import _delta, _free_port, _status, invoke
from tests.services import FakeCoordinator, publish_to_queue, serving, small_config
from tests.unit.test_coordinator_cli import assert_one_line_error

pytestmark = pytest.mark.integration

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((path for name in BROWSERS if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason=f"no headless browser: none of {', '.join(BROWSERS)} is on PATH "
    "(`make browser` installs chromium as root with apt-get)")
ALICE_DEVICE = "cuda: NVIDIA H200"  # what alice says it trains on; bob says nothing


@pytest.fixture
def coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator with a dashboard that applied two volunteers' deltas and rejected one, all
    committed and settled; one eval (at the start), so that no later one tells documents apart.
    alice reports its device, bob none."""
    config = small_config(run_name, tmp_path, dashboard=DashboardConfig(port=_free_port()),
                          eval_interval_s=3600)
    with serving(config) as coord:
        alice = DeltaMessage.decode(_delta(coord, client_id="alice", seq=0, local_steps=10))
        publish_to_queue(run_name, [replace(alice, device=ALICE_DEVICE).encode(),
                                    _delta(coord, client_id="bob", seq=0, local_steps=20),
                                    b"\x00 not a delta"])
        wait_for(lambda: (s := _status(run_name)).get("deltas", {}).get("applied") == 2
                 and s["deltas"]["rejected"] == 1 and not coord.batch and s["commits"] == coord.run.commits
                 and s["queue"]["depth"] == 0 and s["queue"]["dead_letters"] == 1,
                 what="every delta committed and settled in status")
        yield coord


def _get(coord: Coordinator, path: str, *, method: str = "GET",
         host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request to the dashboard."""
    assert coord.dashboard.address is not None
    address, port = coord.dashboard.address
    connection = http.client.HTTPConnection(address, port, timeout=5)
    try:
        connection.request(method, path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _status_json(run: str) -> dict[str, Any]:
    result = invoke(["status", "--run", run, "--redis", REDIS_URL, "--amqp", AMQP_URL, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _api_status(coord: Coordinator) -> dict[str, Any]:
    code, headers, body = _get(coord, "/api/status")
    assert code == 200 and headers["content-type"].startswith("application/json"), (code, body)
    return json.loads(body)


def test_api_status_is_the_document_status_json_prints(coordinator: Coordinator, run_name: str) -> None:
    printed = _status_json(run_name)
    served = _api_status(coordinator)
    # The same document, built each second: only the time it was built may differ.
    del printed["updated_at"], served["updated_at"]
    assert served == printed
    assert served["deltas"]["applied"] == 2 and served["deltas"]["rejected_by_reason"] == {"undecodable": 1}
    assert [c["client_id"] for c in served["clients"]] == ["alice", "bob"]
    assert [c["reported_device"] for c in served["clients"]] == [ALICE_DEVICE, ""]
    # the charts' ring holds the one eval, with the applied deltas of the first document that held it
    code, _, body = _get(coordinator, "/api/history")
    points = json.loads(body)["points"]
    assert code == 200 and len(points) == 1
    assert points[0]["loss"] == served["eval"]["latest"] == served["eval"]["history"][0]["loss"]
    assert points[0]["version"] == served["eval"]["history"][0]["version"]
    assert 0 <= points[0]["applied"] <= 2


class _Page(HTMLParser):
    """The rendered DOM: the text of each element with an id, and each table's body rows as text."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the open elements
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id")
        if tag == "table":
            self._table = ident
        if tag == "tr" and self._table and any(t == "tbody" for t, _ in self._open):
            self.rows.setdefault(self._table, []).append([])
        if tag == "td" and self._table in self.rows and any(t == "tbody" for t, _ in self._open):
            self.rows[self._table][-1].append("")
        self._open.append((tag, ident))
        if ident:
            self.by_id[ident] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()[0] != tag:
            pass
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.by_id[ident] += data
        if self._open and any(t == "td" for t, _ in self._open) and self._table in self.rows:
            self.rows[self._table][-1][-1] += data


@needs_chromium
def test_the_page_in_chromium_shows_the_status_numbers(coordinator: Coordinator, run_name: str) -> None:
    assert CHROMIUM is not None and coordinator.dashboard.url is not None
    dom = subprocess.run(
        [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
         "--dump-dom", coordinator.dashboard.url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    page = _Page()
    page.feed(dom)
    status = _status_json(run_name)
    shown = page.by_id
    assert shown["state"] == "serving", shown.get("error")
    assert shown["run"] == run_name
    assert shown["applied"] == str(status["deltas"]["applied"]) == "2"
    assert shown["rejected"] == str(status["deltas"]["rejected"])
    assert shown["version"] == str(status["version"])
    assert shown["queue-depth"] == str(status["queue"]["depth"])
    assert shown["dead-letters"] == str(status["queue"]["dead_letters"])
    assert float(shown["eval-loss"]) == pytest.approx(status["eval"]["latest"], abs=5e-5)
    assert int(shown["tokens"].replace(",", "")) == status["progress"]["tokens"]
    volunteers = {row[0]: row for row in page.rows["volunteers"]}
    assert set(volunteers) == {c["client_id"] for c in status["clients"]} == {"alice", "bob"}
    for c in status["clients"]:
        assert volunteers[c["client_id"]][9] == str(c["updates"])  # the "applied" column
    # the "device (reported)" column: the volunteer's claim, a dash where it made none
    assert [volunteers[name][1] for name in ("alice", "bob")] == [ALICE_DEVICE, "–"]
    assert [c["reported_device"] for c in status["clients"]] == [ALICE_DEVICE, ""]
    # the leaderboard: by accepted tokens, most first
    board = [(row[1], int(row[2].replace(",", ""))) for row in page.rows["leaderboard"]]
    assert board == sorted(((c["client_id"], c["tokens"]) for c in status["clients"]), key=lambda t: -t[1])
    outcomes = {row[0]: row[1] for row in page.rows["outcomes"]}
    assert outcomes == {"applied": "2", "duplicate": "0", "rejected": "1", "undecodable": "1"}
    assert "<polyline" in dom  # the eval-loss charts were drawn


def test_the_server_answers_get_of_its_own_paths_to_loopback_names(coordinator: Coordinator) -> None:
    code, headers, body = _get(coordinator, "/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    # strings into the DOM as text only; nothing from anywhere else (the one URL is SVG's namespace)
    assert b".innerHTML" not in body and b".outerHTML" not in body and b"insertAdjacentHTML" not in body
    assert b"://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
    assert _get(coordinator, "/", method="HEAD")[0] == 200
    assert _get(coordinator, "/api/status", host="localhost")[0] == 200
    assert _get(coordinator, "/api/status?x=<script>")[0] == 200
    code, _, body = _get(coordinator, "/<script>alert(1)</script>")
    assert code == 404 and b"script" not in body
    assert _get(coordinator, "/api/status", method="POST")[0] == 501
    # a web page that rebinds its own name to 127.0.0.1 is refused
    assert _get(coordinator, "/api/status", host="attacker.example:8080")[0] == 403


def test_the_dashboard_stops_with_the_coordinator(run_name: str, tmp_path: Path) -> None:
    config = small_config(run_name, tmp_path, dashboard=DashboardConfig(port=_free_port()))
    with serving(config) as coord:
        assert coord.dashboard.address is not None
        address = coord.dashboard.address
        wait_for(lambda: _get(coord, "/api/status")[0] == 200, what="the first status document")
    assert coord.dashboard.address is None
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=2):
        pass


def test_serve_takes_the_dashboard_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           fake_service: list[FakeCoordinator]) -> None:
    base = ["serve", "--checkpoint-dir", str(tmp_path), "--redis", REDIS_URL]
    assert invoke(base).exit_code == 0
    assert invoke([*base, "--dashboard", "8050", "--dashboard-host", "::1"]).exit_code == 0
    monkeypatch.setenv("ASYNCLOCO_DASHBOARD", "8051")
    assert invoke(base).exit_code == 0
    dashboards = [c.config.dashboard for c in fake_service]
    assert dashboards == [DashboardConfig(), DashboardConfig(8050, "::1"), DashboardConfig(8051)]
    assert_one_line_error(invoke([*base, "--dashboard", "70000"]), 2, "--dashboard")


def test_serve_on_a_taken_dashboard_port_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_install_signals", lambda stop: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke(["serve", "--run", "probe-dashboard", "--auth", "open", "--checkpoint-dir",
                         str(tmp_path), "--redis", REDIS_URL, "--amqp", AMQP_URL, "--max-seconds", "1",
                         "--dashboard", str(port)])
    assert_one_line_error(result, 1, f"cannot serve the dashboard on 127.0.0.1:{port}")
