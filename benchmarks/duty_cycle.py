"""Duty cycle: how much of a client's wall time is compute (issue 12).

Each case is a fresh run: one real coordinator process (``scale.ServedRun``: the harness's command
line, one torch thread, no evaluation after the first) and one real client, the project's own
``Worker`` in this process on the CPU with one torch thread, int8 deltas, ``--slowdown S`` to
emulate a slower machine (each step takes S times its compute, the rest a sleep: compute that
leaves the CPU free, as a GPU's does). The coordinator's ``--local-steps`` (DyLU off) fixes the
round length.
Per round the worker reports where its wall time went (``RoundReport``: ``fetch_s``,
``compute_s``, ``encode_s``, ``upload_s``, ``wait_s``); the wall of a round is the time between
two round reports, so ``other`` is what no field covers (the report, the step before training).
The first round (the first snapshot's read, torch warming up) is not counted.

    compute share = Σ compute_s / Σ wall      communication = fetch + encode + send + wait

``send`` is how long the delta's send took wherever it ran (with ``--overlap`` in a thread while
the next round trains: then the round's ``upload_s`` is only its wait for that send).
``--uplink-mb-s R`` holds each send back by its bytes' time on an R MB/s link, for a volunteer
whose upload is slower than loopback.

Targets (issue 12): a compute share of at least 95% where compute per round is at least twice the
communication, and at least 80% with a 25M-parameter model. A client runs fetch → train →
encode → upload → wait for its delta's verdict one after another (the next round must start
from a snapshot that includes its last delta), so with compute = 2 × communication its share is at
most 2/3: the 95% target needs the next round to overlap the last one's communication.

    .venv/bin/python benchmarks/duty_cycle.py                        # ~6 min on 2 cores
    .venv/bin/python benchmarks/duty_cycle.py --cases tiny:1,tiny:8  # model:slowdown, one run each
    .venv/bin/python benchmarks/duty_cycle.py --cases tiny:1,tiny:1:overlap --uplink-mb-s 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from scale import ServedRun
from table_csv import write_rows

from client.config import ClientConfig
from client.events import RoundStart, WorkerEvents
from client.report import RoundReport
from client.uploader import Upload
from client.worker import Worker
from harness.faults import run_key, status
from harness.processes import AMQP_URL, REDIS_URL, ensure_services
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings

RESULTS = Path(__file__).resolve().parent / "results" / "duty_cycle"
DEFAULT_CASES = "tiny:1,tiny:1:overlap,tiny:4,tiny:4:overlap,medium:1,medium:1:overlap"
FIELDS = ("fetch_s", "compute_s", "encode_s", "upload_s", "wait_s")


class RoundStarts(WorkerEvents):
    """When each round's training began (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def round_started(self, start: RoundStart) -> None:
        self.at.append(time.monotonic())


def measure(model: str, slowdown: float, *, overlap: bool, local_steps: int, rounds: int,
            workdir: Path, uplink_mb_s: float = 0.0) -> dict[str, Any]:
    """One run: ``rounds`` counted rounds of one client (the first is not counted, and the last
    ends no wall: the next round's start ends a round's); the row of the table."""
    extra = ["--eval-interval", "3600", "--local-steps", str(local_steps), "--no-dylu"]
    with ServedRun(model=model, extra=extra, workdir=workdir, start_timeout_s=300, lifetime_s=3600,
                   prefix="bench-duty") as served:
        config = ClientConfig(
            run=served.run, connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
            device="cpu", codec="int8", slowdown=slowdown, state_dir=served.workdir / "client",
            threads=1, max_rounds=rounds + 2, coordinator_key=run_key(served.workdir)[1], overlap=overlap)
        starts = RoundStarts()
        reports: list[RoundReport] = []
        sending: dict[int, float] = {}  # seq -> seconds its send took, wherever it ran
        with Worker(config, events=starts) as worker:
            send = worker.uploader.send

            def timed(message: DeltaMessage, **kwargs: Any) -> Upload:
                began = time.monotonic()
                if uplink_mb_s:  # a slower link than loopback: the delta's time on the wire
                    time.sleep(sum(len(b) for b in message.tensors.values()) / (uplink_mb_s * 1e6))
                upload = send(message, **kwargs)
                sending[message.seq] = time.monotonic() - began
                return upload

            worker.uploader.send = timed  # type: ignore[method-assign]
            worker.run(on_round=reports.append)
        served.stop_coordinator()  # a clean stop evaluates the last version
        history = status(served.run).get("eval", {}).get("history", [])
    # a round's wall: from its start to the next one's (compute, encode, upload, wait, and the
    # next round's fetch)
    walls = [b - a for a, b in zip(starts.at[1:], starts.at[2:], strict=False)]
    counted = reports[1:1 + len(walls)]
    if len(counted) < rounds or not all(r.sent for r in reports):
        raise RuntimeError(f"{model} x{slowdown}: {len(counted)} rounds, sent {[r.sent for r in reports]}")
    per_round = {f: statistics.median(getattr(r, f) for r in counted) for f in FIELDS}
    compute, wall = sum(r.compute_s for r in counted), sum(walls)
    # the communication's work, where it ran: a send in the background (--overlap) counts its own
    # duration, not the round's wait for it
    communication = sum(r.fetch_s + r.encode_s + r.wait_s + sending[r.seq] for r in counted)
    return {
        "model": model, "slowdown": slowdown, "overlap": overlap, "uplink_mb_s": uplink_mb_s or None,
        "local_steps": local_steps, "send_s": round(statistics.median(sending[r.seq] for r in counted), 3),
        "rounds": len(counted),
        "wall_s": round(statistics.median(walls), 3),
        **{f: round(v, 3) for f, v in per_round.items()},
        "other_s": round(statistics.median(w - sum(getattr(r, f) for f in FIELDS)
                                           for w, r in zip(walls, counted, strict=True)), 3),
        "compute_per_comm": round(compute / communication, 2) if communication > 0 else None,
        "compute_share": round(compute / wall, 4),
        "sent_mb": round(statistics.median(r.sent_bytes for r in counted) / 1e6, 2),
        "received_mb": round(statistics.median(r.received_bytes for r in counted) / 1e6, 2),
        "applied": sum(1 for r in reports if r.fate.verdict is not None and r.fate.verdict.applied),
        "final_eval": round(history[-1]["loss"], 4) if history and history[-1]["loss"] is not None else None,
    }


def target(row: dict[str, Any]) -> str:
    """The issue's target that applies to the row, and whether it is met."""
    if row["model"] == "medium":
        goal = 0.80
    elif (row["compute_per_comm"] or 0) >= 2.0:
        goal = 0.95
    else:
        return "-"
    return f"≥ {goal:.0%}: {'met' if row['compute_share'] >= goal else 'missed'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="model:slowdown[:overlap] cases, comma-separated")
    parser.add_argument("--local-steps", type=int, default=12,
                        help="steps a round (tiny); medium takes a third")
    parser.add_argument("--rounds", type=int, default=6, help="rounds counted per case (after the first)")
    parser.add_argument("--uplink-mb-s", type=float, default=0.0,
                        help="emulate an uplink of this many MB/s (each send held back its bytes' time "
                        "on such a link); 0: loopback as it is")
    parser.add_argument("--out", type=Path, default=RESULTS / "duty_cycle.csv")
    args = parser.parse_args()
    ensure_services()
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="asyncloco-duty-"))
    try:
        for case in args.cases.split(","):
            model, slowdown, *more = case.split(":")
            steps = args.local_steps if model == "tiny" else max(1, args.local_steps // 3)
            started = time.monotonic()
            row = measure(model, float(slowdown or 1), overlap=more == ["overlap"], local_steps=steps,
                          rounds=args.rounds, workdir=workdir, uplink_mb_s=args.uplink_mb_s)
            rows.append({**row, "target": target(row)})
            took = time.monotonic() - started
            print(f"{case}: compute share {row['compute_share']:.1%} ({took:.0f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_rows(args.out, rows)
    columns = ("model", "slowdown", "overlap", "uplink_mb_s", "local_steps", "wall_s", *FIELDS, "send_s",
               "other_s",
               "compute_per_comm", "compute_share", "target", "applied", "final_eval")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"medians per round over {args.rounds} rounds; CSV: {args.out}")


if __name__ == "__main__":
    main()
