"""Is a rejoin harmless? Two real clients; one is killed with SIGKILL and rejoins under its id.

Starts the real coordinator (its defaults) and two clients (``--slowdown 1`` and ``2``) on the real
Redis and RabbitMQ. At ``--kill-at`` seconds the slower one is killed with SIGKILL; ``--away``
seconds later it is started again with the same client id and state directory (a fresh process:
fresh inner optimizer, warm-up from its first step). Prints the eval loss around the rejoin and
the largest rise within ``--window`` seconds of it, against the same run without the kill; writes
a CSV. Every process it starts is stopped by pid.

    python benchmarks/rejoin.py            # ~5 min on 2 cores
    python benchmarks/rejoin.py --outer-lr 0.7 --outer-momentum 0.9 \
        --coordinator-options "--strategy dn --compute-exponent 0 --grace-rounds 0"   # the old defaults
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from real_vs_sync import BenchRun, loss_at
from table_csv import write_rows


def run(args: argparse.Namespace, workdir: Path, *, kill: bool) -> list[tuple[float, float]]:
    """One run; [(seconds since the clients started, eval loss)]."""
    with BenchRun("rejoin" if kill else "steady", args, workdir) as bench:
        bench.coordinator(args.coordinator_options.split(), args.seconds)
        started = time.time()
        fast = bench.client("fast", 1, args.seconds)
        slow = bench.client("slow", 2, args.seconds)
        if kill:
            time.sleep(max(0.0, started + args.kill_at - time.time()))
            os.kill(slow.pid, signal.SIGKILL)
            slow.wait()
            time.sleep(args.away)
            slow = bench.client("slow", 2, args.seconds - args.kill_at - args.away)
        for proc in (fast, slow):
            proc.wait(timeout=args.seconds + 120)
        return bench.curve(started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--kill-at", type=float, default=50)
    parser.add_argument("--away", type=float, default=10)
    parser.add_argument("--window", type=float, default=30, help="seconds after the rejoin to watch")
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--outer-lr", type=float, default=0.5)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--coordinator-options", default="",
                        help='more `serve` options, e.g. "--strategy dn --compute-exponent 0"')
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--out", type=Path, default=Path("results/rejoin.csv"))
    args = parser.parse_args()
    if not 0 < args.kill_at < args.kill_at + args.away < args.seconds:
        parser.error("need 0 < --kill-at < --kill-at + --away < --seconds")
    with tempfile.TemporaryDirectory(prefix="asyncloco-rejoin-") as tmp:
        curves = {label: run(args, Path(tmp), kill=label == "rejoin") for label in ("steady", "rejoin")}
    back = args.kill_at + args.away
    print(f"\nslow client killed at {args.kill_at:.0f} s, back at {back:.0f} s")
    print(f"{'wall s':>7} {'steady':>9} {'rejoin':>9}")
    rows = []
    for t in range(10, int(args.seconds) + 1, 10):
        steady, rejoin = loss_at(curves["steady"], t), loss_at(curves["rejoin"], t)
        rows.append({"wall_s": t, "steady_eval": steady, "rejoin_eval": rejoin})
        print(f"{t:>7} {steady if steady is not None else float('nan'):>9.4f} "
              f"{rejoin if rejoin is not None else float('nan'):>9.4f}")
    for label, curve in curves.items():
        before = loss_at(curve, back)
        after = [loss for when, loss in curve if back < when <= back + args.window]
        if before is not None and after:
            print(f"{label}: eval {before:.4f} at {back:.0f} s, highest within {args.window:.0f} s after: "
                  f"{max(after):.4f} (rise {max(after) - before:+.4f})")
    write_rows(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
