"""The operator's live web dashboard, served by the coordinator (``serve --dashboard PORT``).

One page (``dashboard.html``, package data: inline SVG charts drawn by a little vanilla JS, nothing
fetched from anywhere else) polls two JSON endpoints of this server:

* ``/api/status``: the status document (docs/STATUS.md), the very one the coordinator builds each
  second with :func:`coordinator.status.build_status` and writes to Redis, handed to
  :meth:`Dashboard.show` by the coordinator's loop. It is what ``status --json`` prints, except
  that ``status --json`` asks the broker for ``queue.depth`` at the moment it runs.
* ``/api/history``: the eval losses for the charts, kept in a bounded ring
  (:data:`HISTORY_POINTS`), each with the version and the number of applied deltas of the first
  document that held it (so within a second of its evaluation; ``null`` for the evaluations a
  resumed run brought along, whose count nobody noted).

Safe to leave running: it binds 127.0.0.1 unless told otherwise and then refuses any ``Host`` that
is not a loopback name (a web page cannot reach it by DNS rebinding); it answers GET and HEAD
only, of three fixed paths, reflects nothing of a request; the page puts every string from the run
(volunteers' ids and reported devices, reasons) into the DOM as text, under a
Content-Security-Policy that runs no script but its own; a response is at most
:data:`MAX_BODY_BYTES`; at most :data:`MAX_CONNECTIONS` connections are served at once, each for at
most :data:`CONNECTION_TIMEOUT_S` of silence.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import socket
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from coordinator.config import DashboardConfig
from coordinator.http_serving import stop_server
from shared.errors import ConfigError

log = logging.getLogger(__name__)

PAGE = "dashboard.html"
HISTORY_POINTS = 2000  # evaluations kept for the charts: ~100 bytes each in /api/history
MAX_BODY_BYTES = 8 * 1024**2  # a status document past this (tens of thousands of volunteers) is refused
MAX_CONNECTIONS = 32
CONNECTION_TIMEOUT_S = 10.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8080`` → ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _csp_hash(page: str, tag: str) -> str:
    """The CSP source of the page's one inline ``<tag>`` element: its text's SHA-256."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
    if match is None:
        raise ValueError(f"{PAGE} has no <{tag}> element")
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


class Dashboard:
    """The dashboard of one coordinator and, when ``config.port`` is set, its HTTP server.

    The coordinator's loop calls :meth:`show` with each status document it builds; the server's
    threads only read what the last call left (under a lock), so a page never sees the run's state
    change under it.
    """

    def __init__(self, config: DashboardConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._doc: dict[str, Any] | None = None
        self._body: bytes | None = None  # self._doc as JSON, made by the first request that wants it
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- what it shows
    def show(self, doc: dict[str, Any]) -> None:
        """Serve ``doc`` (a status document, never changed after this call) from now on, and note
        the evaluations in it that are new, the newest with ``doc``'s count of applied deltas."""
        with self._lock:
            self._doc, self._body = doc, None
            last = self._history[-1]["time"] if self._history else float("-inf")
            entries = [e for e in doc["eval"]["history"] if e["time"] > last]
            for i, entry in enumerate(entries):
                newest = i == len(entries) - 1
                self._history.append({**entry, "applied": doc["deltas"]["applied"] if newest else None})

    def status_body(self) -> bytes | None:
        """The newest status document as JSON (None before the first)."""
        with self._lock:
            if self._body is None and self._doc is not None:
                self._body = json.dumps(self._doc, sort_keys=True, allow_nan=False).encode()
            return self._body

    def history_body(self) -> bytes:
        with self._lock:
            points = list(self._history)
        return json.dumps({"points": points}, allow_nan=False).encode()

    # ---------------------------------------------------------------- the HTTP server
    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the dashboard is served on; None when not served."""
        if self._server is None:
            return None
        return self.config.host, int(self._server.server_address[1])

    @property
    def url(self) -> str | None:
        if self.address is None:
            return None
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> None:
        """Serve the dashboard in a daemon thread, if a port is configured; a port that cannot be
        had is a :class:`ConfigError`, raised before the coordinator changes anything."""
        if not self.config.port or self._server is not None:
            return
        host, port = self.config.host, self.config.port
        page = resources.files("coordinator").joinpath(PAGE).read_text(encoding="utf-8")
        try:
            self._server = _Server((host, port), dashboard=self, page=page)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {host}:{port} ({exc.strerror or exc}); "
                              "pick another --dashboard port or --dashboard-host") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="dashboard", daemon=True)
        self._thread.start()
        log.info("serving the dashboard on %s", self.url)

    def stop(self) -> None:
        stop_server(self._server, self._thread)
        self._server = self._thread = None


class _Server(ThreadingHTTPServer):
    """A threading HTTP server with a bound on the connections it serves at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, dashboard: Dashboard, page: str) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.dashboard = dashboard
        self.page = page.encode()
        self.page_csp = (f"default-src 'none'; script-src {_csp_hash(page, 'script')}; "
                         f"style-src {_csp_hash(page, 'style')}; connect-src 'self'; img-src 'self'; "
                         "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        self.loopback_only = _is_loopback(address[0])
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # full: close at once rather than queue threads
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD of ``/``, ``/api/status`` and ``/api/history``; everything else is refused."""

    server: _Server
    timeout = CONNECTION_TIMEOUT_S
    server_version = "asyncloco-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body_wanted=True)

    def do_HEAD(self) -> None:
        self._answer(body_wanted=False)

    def _answer(self, *, body_wanted: bool) -> None:
        server = self.server
        if server.loopback_only and not _is_loopback(_host_name(self.headers.get("Host", ""))):
            self._send(403, b"this dashboard answers to 127.0.0.1 and localhost only\n", "text/plain",
                       body_wanted)
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, server.page, "text/html", body_wanted, csp=server.page_csp)
        elif path == "/api/status":
            body = server.dashboard.status_body()
            if body is None:
                self._send(503, b'{"error": "no status yet: the coordinator is starting"}',
                           "application/json", body_wanted)
            elif len(body) > MAX_BODY_BYTES:
                self._send(503, b'{"error": "the status document is too large for the dashboard; '
                           b'use asyncloco-coordinator status --json"}', "application/json", body_wanted)
            else:
                self._send(200, body, "application/json", body_wanted)
        elif path == "/api/history":
            self._send(200, server.dashboard.history_body(), "application/json", body_wanted)
        else:
            self._send(404, b"not found\n", "text/plain", body_wanted)

    def _send(self, code: int, body: bytes, content_type: str, body_wanted: bool, *,
              csp: str = "default-src 'none'; frame-ancestors 'none'") -> None:
        self.send_response(code)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", csp)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if body_wanted:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)
