"""``make demo``: one coordinator and three clients of different speeds train the tiny model.

Invites three volunteers (``asyncloco-coordinator invite``: each gets its own broker and Redis
user and a join token), starts ``asyncloco-coordinator serve`` and three ``asyncloco-client join
--token-file`` processes with ``--slowdown 1, 2, 4`` (emulating a fast, a middling and a slow
machine), lets them train for ``--seconds`` (default 180), stops everything it started (by pid),
revokes the three volunteers, and prints a summary table that ends with
``final eval loss: X.XXX``. Logs and tokens go to ``.asyncloco/demo/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = [("demo-fast", 1.0), ("demo-medium", 2.0), ("demo-slow", 4.0)]


def _status(client: redis.Redis, run: str) -> dict:
    raw = client.get(f"asyncloco:{run}:status")
    return json.loads(raw) if raw else {}


def _stop(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM our own processes, wait, then SIGKILL any that linger."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="training time (default 180)")
    parser.add_argument("--run", default="demo")
    # Three clients, H = 30 from scratch: DiLoCo's ε = 0.7, β = 0.9 oscillate here (eval 2.1-2.2
    # after 3 min); ε = 0.5, β = 0.8 fall steadily (see docs/BENCHMARKS.md).
    parser.add_argument("--outer-lr", type=float, default=0.5)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--redis", default=os.environ.get("ASYNCLOCO_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--amqp", default=os.environ.get("ASYNCLOCO_AMQP",
                                                         "amqp://guest:guest@127.0.0.1:5672/%2F"))
    args = parser.parse_args()

    out = ROOT / ".asyncloco" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    # the demo's clients train on battery too (a volunteer's default pauses while unplugged)
    env = dict(os.environ, PYTHONUNBUFFERED="1", ASYNCLOCO_REDIS=args.redis, ASYNCLOCO_AMQP=args.amqp,
               ASYNCLOCO_RUN_ON_BATTERY="1")
    env.pop("ASYNCLOCO_RUN", None)
    client_env = {k: v for k, v in env.items() if k not in ("ASYNCLOCO_REDIS", "ASYNCLOCO_AMQP")}
    python = sys.executable
    checkpoint = out / "checkpoint"
    admin = ["--run", args.run, "--checkpoint-dir", str(checkpoint)]
    coordinator_cmd = [
        python, "-m", "coordinator.cli", "serve", "--run", args.run, "--model-size", "tiny",
        "--checkpoint-dir", str(checkpoint), "--fresh", "--threads", "1",
        "--eval-interval", "10", "--max-seconds", str(args.seconds + 120),
        "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum),
    ]
    procs: list[subprocess.Popen] = []
    logs = []
    r = redis.Redis.from_url(args.redis, socket_timeout=5)
    try:
        for client_id, _ in CLIENTS:
            # A demo stopped hard last time may have left its volunteers: cut them off first.
            subprocess.run([python, "-m", "coordinator.cli", "revoke", client_id, *admin], cwd=ROOT, env=env,
                           capture_output=True, timeout=60)
            invited = subprocess.run(
                [python, "-m", "coordinator.cli", "invite", client_id, *admin, "--expires", "1d",
                 "--token-file", str(out / f"{client_id}.token")],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            if invited.returncode != 0:
                print(f"demo: could not invite {client_id}: {invited.stderr.strip()}", file=sys.stderr)
                return 1
            print(f"demo: {invited.stdout.strip()}", flush=True)
        log = open(out / "coordinator.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        coordinator = subprocess.Popen(coordinator_cmd, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        procs.append(coordinator)
        print(f"demo: coordinator pid {coordinator.pid} (log {out / 'coordinator.log'})", flush=True)
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline:
            status = _status(r, args.run)
            state = status.get("coordinator", {}).get("state")
            if state == "serving" and status.get("eval", {}).get("latest"):
                run_id = status["run_id"]
                break
            if coordinator.poll() is not None:
                print(f"demo: the coordinator exited early; see {out / 'coordinator.log'}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if run_id is None:
            print("demo: the coordinator did not come up within 120 s", file=sys.stderr)
            return 1
        for client_id, slowdown in CLIENTS:
            log = open(out / f"{client_id}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(  # the token says where and who: no server URLs in its env
                [python, "-m", "client.cli", "join", "--token-file", str(out / f"{client_id}.token"),
                 "--slowdown", str(slowdown), "--threads", "1", "--device", "cpu",
                 "--state-dir", str(out / "state"), "--max-seconds", str(args.seconds)],
                cwd=ROOT, env=client_env, stdout=log, stderr=subprocess.STDOUT,
            ))
            print(f"demo: client {client_id} (--slowdown {slowdown:g}) pid {procs[-1].pid}", flush=True)
        started = time.monotonic()
        clients = procs[1:]
        while any(p.poll() is None for p in clients):
            time.sleep(2)
            elapsed = time.monotonic() - started
            if int(elapsed) % 20 < 2:
                s = _status(r, args.run)
                per = " ".join(f"{c['client_id']}={c['updates']}" for c in s.get("clients", []))
                print(f"  t={elapsed:4.0f}s  version {s.get('version')}  eval {s['eval']['latest']:.3f}  "
                      f"updates: {per}", flush=True)
            if elapsed > args.seconds + 90:
                print("demo: clients did not stop in time; stopping them", file=sys.stderr)
                break
        _stop(clients, 30)
        _stop([coordinator], 60)
        status = _status(r, args.run)
        history = status["eval"]["history"]
        ok = _report(status, history, args.seconds, out)
        failed = [p for p in procs if p.returncode not in (0, -signal.SIGTERM)]
        if failed:
            print(f"demo: {len(failed)} process(es) failed; see the logs in {out}", file=sys.stderr)
            return 1
        return 0 if ok else 1
    finally:
        _stop(procs, 10)
        for log in logs:
            log.close()
        for client_id, _ in CLIENTS:  # their users go with the demo
            subprocess.run([python, "-m", "coordinator.cli", "revoke", client_id, *admin], cwd=ROOT, env=env,
                           capture_output=True, timeout=60)


def _report(status: dict, history: list[dict], seconds: float, out: Path) -> bool:
    clients = {c["client_id"]: c for c in status["clients"]}
    print()
    print(f"asyncloco demo: tiny byte-level LM, {len(CLIENTS)} clients, {seconds:.0f} s of training")
    print(f"{'client':<12} {'slowdown':>8} {'updates':>8} {'local steps':>11} {'steps/round':>11} "
          f"{'steps/s':>8} {'rejected':>8}")
    ok = True
    for client_id, slowdown in CLIENTS:
        c = clients.get(client_id)
        if c is None or c["updates"] == 0:
            print(f"{client_id:<12} {slowdown:>8g}  no update applied")
            ok = False
            continue
        print(f"{client_id:<12} {slowdown:>8g} {c['updates']:>8} {c['local_steps']:>11} "
              f"{c['local_steps'] / c['updates']:>11.1f} {c['steps_per_s'] or 0:>8.2f} {c['rejected']:>8}")
    d = status["deltas"]
    reasons = ", ".join(f"{k} {v}" for k, v in d["rejected_by_reason"].items())
    print(f"deltas applied {d['applied']}, duplicate {d['duplicate']}, rejected {d['rejected']}"
          f"{f' ({reasons})' if reasons else ''}; final version {status['version']}")
    first, last = history[0], history[-1]
    print(f"eval loss (nats/byte): start {first['loss']:.3f} (v{first['version']}) -> "
          f"end {last['loss']:.3f} (v{last['version']}); logs in {out}")
    print(f"final eval loss: {last['loss']:.3f}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
