"""Real processes: asynchronous DN+DyLU against synchronous DiLoCo at equal wall-clock time.

Starts the real coordinator and 4 real clients (``--slowdown 1,2,4,8``) on the real Redis and
RabbitMQ, once with ``--strategy dn`` (Dynamic Local Updates on) and once with ``--strategy sync``
(every round waits for all four), each for ``--seconds`` of training, and prints the global model's
eval loss at equal wall-clock points; writes a CSV. Every process it starts is stopped by pid.

    python benchmarks/real_vs_sync.py --seconds 120
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from coordinator.run_admin import delete_run
from shared.keys import RunKeys
from shared.settings import ConnectionSettings
from shared.signing import KEY_FILE_NAME, SigningKey

ROOT = Path(__file__).resolve().parent.parent
SLOWDOWNS = (1, 2, 4, 8)


def _status(client: redis.Redis, run: str) -> dict:
    raw = client.get(RunKeys(run).status)
    return json.loads(raw) if raw else {}


def _stop(procs: list[subprocess.Popen], timeout_s: float = 30) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_one(strategy: str, args: argparse.Namespace, workdir: Path) -> list[tuple[float, float]]:
    """Train with ``strategy``; return [(seconds since the clients started, eval loss)]."""
    run = f"bench-{strategy}-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", ASYNCLOCO_REDIS=args.redis, ASYNCLOCO_AMQP=args.amqp)
    r = redis.Redis.from_url(args.redis)
    procs: list[subprocess.Popen] = []
    logs = []
    key_file = workdir / f"{run}-{KEY_FILE_NAME}"  # made here, so the clients can pin it
    coordinator_key = SigningKey.load_or_create(key_file).public_hex
    try:
        log = open(workdir / f"{run}-coordinator.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--run", run, "--auth", "open",
             "--strategy", strategy, "--model-size", "tiny", "--threads", "1",
             "--checkpoint-dir", str(workdir / run), "--signing-key", str(key_file),
             "--local-steps", str(args.local_steps), "--eval-interval", "5",
             "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum),
             "--max-seconds", str(args.seconds + 120)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while not _status(r, run).get("eval", {}).get("latest"):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"coordinator for {strategy} did not come up; see {workdir}")
            time.sleep(0.5)
        started_wall = time.time()
        for slowdown in SLOWDOWNS:
            log = open(workdir / f"{run}-client{slowdown}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "client.cli", "join", "--run", run, "--client-id", f"x{slowdown}",
                 "--slowdown", str(slowdown), "--threads", "1", "--device", "cpu",
                 "--state-dir", str(workdir / "state"), "--max-seconds", str(args.seconds),
                 "--coordinator-key", coordinator_key],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs[1:]:
            proc.wait(timeout=args.seconds + 120)
        _stop(procs[:1])
        history = _status(r, run)["eval"]["history"]
        return [(h["time"] - started_wall, h["loss"]) for h in history if h["time"] >= started_wall - 1]
    finally:
        _stop(procs)
        for log in logs:
            log.close()
        try:
            delete_run(r, ConnectionSettings(amqp_url=args.amqp), run)  # its processes are stopped
        finally:
            r.close()


def loss_at(curve: list[tuple[float, float]], t: float) -> float | None:
    """The newest eval at or before ``t`` seconds."""
    seen = [loss for when, loss in curve if when <= t]
    return seen[-1] if seen else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--outer-lr", type=float, default=0.5)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--points", type=int, default=6, help="equal wall-clock points to compare")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--out", type=Path, default=Path("results/real_vs_sync.csv"))
    args = parser.parse_args()
    curves = {}
    with tempfile.TemporaryDirectory(prefix="asyncloco-bench-") as tmp:
        for strategy in ("dn", "sync"):
            print(f"running {strategy} for {args.seconds:.0f} s with clients at --slowdown "
                  f"{','.join(map(str, SLOWDOWNS))} ...", flush=True)
            curves[strategy] = run_one(strategy, args, Path(tmp))
    points = [args.seconds * (i + 1) / args.points for i in range(args.points)]
    print(f"\n{'wall s':>7} {'dn+dylu':>9} {'sync':>9}  ahead")
    rows = []
    for t in points:
        dn, sync = loss_at(curves["dn"], t), loss_at(curves["sync"], t)
        ahead = "dn+dylu" if dn is not None and (sync is None or dn < sync) else "sync"
        rows.append({"wall_s": round(t, 1), "dn_dylu_eval": dn, "sync_eval": sync, "ahead": ahead})
        print(f"{t:>7.0f} {dn if dn is not None else float('nan'):>9.4f} "
              f"{sync if sync is not None else float('nan'):>9.4f}  {ahead}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
