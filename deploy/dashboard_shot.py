"""The dashboard's screenshot in docs/: a short real run, photographed by headless Chromium.

Starts ``asyncloco-coordinator serve --auth open --dashboard PORT`` on the tiny model and two
``asyncloco-client join`` processes (``--slowdown 1`` and ``3``), lets them train for ``--seconds``
(default 90), takes ``chromium --headless=new --screenshot=OUT --window-size=1280,900`` of the
dashboard while they still run, then stops everything it started (by pid, as ``make demo`` does)
and deletes the run's keys and queues. Needs the servers (``make services``) and a chromium on
PATH (``make browser``). Logs go to ``.asyncloco/dashboard_shot/``.

    .venv/bin/python deploy/dashboard_shot.py [--seconds 90] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from demo import _stop  # this folder's demo: SIGTERM our own processes, then SIGKILL stragglers

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = [("volunteer-fast", 1.0), ("volunteer-slow", 3.0)]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _dashboard_status(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "api/status", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return {}  # not up yet (or starting: 503)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="training time before the shot")
    parser.add_argument("--run", default="dashboard-shot")
    parser.add_argument("--port", type=int, default=8765, help="the dashboard's port")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        print(f"dashboard_shot: none of {', '.join(BROWSERS)} on PATH (make browser)", file=sys.stderr)
        return 1

    out = ROOT / ".asyncloco" / "dashboard_shot"
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    checkpoint = out / "checkpoint"
    key = subprocess.run([python, "-m", "coordinator.cli", "key", "--checkpoint-dir", str(checkpoint)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    url = f"http://127.0.0.1:{args.port}/"
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(out / "coordinator.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [python, "-m", "coordinator.cli", "serve", "--run", args.run, "--auth", "open",
             "--model-size", "tiny", "--checkpoint-dir", str(checkpoint), "--fresh", "--threads", "1",
             "--eval-interval", "5", "--max-seconds", str(args.seconds + 120), "--dashboard", str(args.port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while not _dashboard_status(url).get("eval", {}).get("latest"):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                print(f"dashboard_shot: the coordinator did not come up; see {out / 'coordinator.log'}",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"dashboard_shot: coordinator pid {procs[0].pid}, dashboard on {url}", flush=True)
        for client_id, slowdown in CLIENTS:
            log = open(out / f"{client_id}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(
                [python, "-m", "client.cli", "join", "--run", args.run, "--client-id", client_id,
                 "--coordinator-key", key, "--slowdown", str(slowdown), "--threads", "1", "--device", "cpu",
                 "--state-dir", str(out / "state"), "--max-seconds", str(args.seconds + 60), "--plain"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"dashboard_shot: client {client_id} (--slowdown {slowdown:g}) pid {procs[-1].pid}",
                  flush=True)
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(15)
            s = _dashboard_status(url)
            print(f"  t={time.monotonic() - started:3.0f}s  version {s.get('version')}  "
                  f"applied {s.get('deltas', {}).get('applied')}  eval {s.get('eval', {}).get('latest')}",
                  flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless=new", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                        "--virtual-time-budget=5000", f"--screenshot={args.out}", "--window-size=1280,900",
                        url], capture_output=True, timeout=60, check=True)
        print(f"dashboard_shot: wrote {args.out}", flush=True)
        return 0
    finally:
        _stop(procs[1:], 30)  # clients first: they send the round in hand
        _stop(procs[:1], 60)
        for log in logs:
            log.close()
        subprocess.run([python, "-m", "coordinator.cli", "delete-run", args.run, "--yes"], cwd=ROOT, env=env,
                       capture_output=True, timeout=60)


if __name__ == "__main__":
    sys.exit(main())
