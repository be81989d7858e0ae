"""Scale: many volunteers against one coordinator, and a 100M-parameter model end to end (issue 13).

Both modes serve one real coordinator process (``served.serve_args``: the harness's command line,
one torch thread, ``--auth open`` so that the benchmark's clients send under ids they pick, the
guard on as served unless ``--guard off``, no evaluation after the first) and feed it from
lightweight client processes (``scale_clients.py``): each client reads the current version, its
signed manifest and the round plan with the client's own fetcher, waits out its round
(``--interval`` ± 25%, a sleep instead of training), and sends a delta of the model's shapes on
that base with the client's own uploader (confirms, parts past 8 MiB), as its own client id with
increasing seqs. The deltas share one direction plus each client's noise, as honest ones do, so the
guard takes them. Every second the coordinator's CPU share and RSS (``/proc``), the queue's ready
messages (a passive declare; up to the coordinator's prefetch, 64, more sit unacked in it), its status
and the client processes' RSS are sampled (``*_series.csv``). When the clients stop, the queue is
drained (``--drain``), the coordinator stopped cleanly (its last commit), and its applied log
judged by ``harness.oracle`` against the ids the broker confirmed: lost (confirmed, neither applied
nor rejected), doubled (applied twice), unexpected (applied, never confirmed).

Default mode: ``--clients`` (200) over ``--processes`` (4), ``--seconds`` (600), the small (4.8M)
model, int8, DyLU on (each client claims the round length the plan assigns it): applied/s
(status, after ``--warmup``), rejections by reason, queue depth (max, last;
*bounded*: the median of the last third of the measured window is not above the first third's by
more than max(5, 10% of the max), and the depth stays under 90% of what ``--max-queue-bytes``
holds, since past that the broker, not the coordinator, bounds it), each client's applied deltas
(min, median, max; *no client starved*: every client got one applied; Jain's fairness index
(Σx)²/(n·Σx²), 1 = equal shares), the coordinator's CPU (share of one core, per second: median,
max) and RSS, and the client processes' RSS.

``--large``: the large bytelm model (100M parameters, a 400 MB fp32 snapshot), ``--no-dylu``,
``--large-clients`` (3) clients each in its own process sending int8 deltas (101 MB: 13 parts), one
of them fetching every new snapshot whole with the client's fetcher: the coordinator's and the
clients' RSS against the model's fp32 bytes, commit and publish seconds (its /metrics), and
applied / lost / doubled. Needs about 9 GB of RAM (measured: the coordinator 3.2 GB, the fetching
client 2 GB, Redis 1.2 GB, RabbitMQ 1 GB, each sender 0.7 GB).

``waiting_share``: the share of the clients' time spent waiting for a version newer than their last
base (the coordinator takes one delta per client per base, so a client waits for a commit).
A client process's RSS includes torch's (~220 MB of it before anything is made).

    .venv/bin/python benchmarks/scale.py                                            # ~11-12 min
    .venv/bin/python benchmarks/scale.py --clients 20 --processes 2 --seconds 30   # smoke: ~45 s
    .venv/bin/python benchmarks/scale.py --large                                    # 120 s: ~3 min
    .venv/bin/python benchmarks/scale.py --large --seconds 60                       # smoke: ~2 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from ceilings import PART_BYTES
from scale_figures import (
    MB,
    applied_per_s,
    cpu_shares,
    delta_bytes,
    mb,
    median,
    metric_mean,
    oracle_figures,
    queue_figures,
    waiting_share,
    window,
)
from served import cpu_seconds, first_manifest, free_port, memory_bytes, scrape, serve_args
from table_csv import write_rows

from coordinator.run_admin import delete_run
from harness.faults import queue_depth, run_key, status
from harness.oracle import read_committed
from harness.processes import AMQP_URL, REDIS_URL, Processes, ensure_services, new_run_name, wait_for
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.settings import ConnectionSettings
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import SnapshotManifest

RESULTS = Path(__file__).resolve().parent / "results" / "scale"
READY_WAIT_S = 600.0  # client processes import torch and make their payloads (100M: ~20 s each)
EXIT_WAIT_S = 90.0  # after stop_at, for the client processes to finish their last sends and exit
BACKSTOP_S = 900.0  # the coordinator stops itself this long after the run should have ended


class ServedRun:
    """One fresh run: its coordinator, client processes and samples. Used as a context manager:
    on the way out everything it started is stopped (by pid, SIGTERM then SIGKILL), the run's keys
    and queues deleted and its directory removed; on a failure the processes' logs are printed
    first. The coordinator also stops itself after ``lifetime_s`` (a backstop should this process
    be killed)."""

    def __init__(self, *, model: str, extra: list[str], workdir: Path, start_timeout_s: float,
                 lifetime_s: float, prefix: str = "bench-scale") -> None:
        self.run = new_run_name(prefix)
        self.workdir = workdir / self.run
        self.workdir.mkdir(parents=True)
        self.checkpoint = self.workdir / "checkpoint"
        self.procs, self.port = Processes(self.workdir), free_port()
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.coordinator = self.procs.start("coordinator", *serve_args(
            self.run, self.checkpoint, model, "--eval-interval", "3600", "--metrics-port", str(self.port),
            "--max-seconds", str(round(lifetime_s)), *extra))
        self.clients: list[Any] = []
        self.samples: list[dict[str, Any]] = []
        try:
            self.manifest: SnapshotManifest = wait_for(self._first_manifest, timeout_s=start_timeout_s,
                                                       what="the coordinator's first snapshot")
        except BaseException:
            self.__exit__(RuntimeError, None, None)
            raise

    def __enter__(self) -> ServedRun:
        return self

    def __exit__(self, failed: type[BaseException] | None, *_: Any) -> None:
        if failed is not None:
            print(self.procs.logs(), file=sys.stderr)
        self.close()

    def _first_manifest(self) -> SnapshotManifest | None:
        if self.coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited ({self.coordinator.returncode}): "
                               f"{self.procs.log('coordinator')[-2000:]}")
        return first_manifest(SnapshotStore(self.redis, RunKeys(self.run)))

    def start_clients(self, groups: list[tuple[int, list[str]]], *, seconds: float) -> tuple[float, float]:
        """One client process per ``(clients, extra args)``; once all made their payloads, they
        start together: return (start_at, stop_at), unix time."""
        key = run_key(self.workdir)[1]  # the key coordinator_args signs with
        for index, (count, extra) in enumerate(groups):
            self.clients.append(self.procs.start(
                f"clients-{index}", "benchmarks/scale_clients.py", "--run", self.run,
                "--coordinator-key", key, "--process", str(index), "--clients", str(count),
                "--ready", str(self.workdir / f"ready-{index}"), "--go", str(self.workdir / "go"),
                "--out", str(self.workdir / f"clients-{index}.json"), *extra))
        wait_for(lambda: self._all_ready(len(groups)), timeout_s=READY_WAIT_S, what="the client processes")
        start_at = time.time() + 1.0
        (self.workdir / "go").write_text(json.dumps({"start_at": start_at, "stop_at": start_at + seconds}))
        return start_at, start_at + seconds

    def _all_ready(self, count: int) -> bool:
        for index, proc in enumerate(self.clients):
            if proc.poll() is not None:
                raise RuntimeError(f"client process {index} exited ({proc.returncode}): "
                                   f"{self.procs.log(f'clients-{index}')[-2000:]}")
        return all((self.workdir / f"ready-{i}").exists() for i in range(count))

    def sample(self, phase: str) -> dict[str, Any]:
        """The coordinator's status counts, CPU seconds and RSS, the queue's ready messages, the
        client processes' RSS: one row of the series."""
        pid = self.coordinator.pid
        doc = status(self.run)
        try:
            depth: int | None = queue_depth(self.run)
        except Exception:  # the broker busy past its timeout: a gap in the series, not the end
            depth = None
        deltas = doc.get("deltas", {})
        row = {"wall": time.time(), "phase": phase, "status_at": doc.get("updated_at"),
               "applied": deltas.get("applied"), "rejected": deltas.get("rejected"),
               "version": doc.get("version"), "depth": depth, "coordinator_cpu_s": cpu_seconds(pid),
               "coordinator_rss": memory_bytes(pid),
               "clients_rss": [memory_bytes(p.pid) for p in self.clients]}  # None once one exited
        self.samples.append(row)
        return row

    def follow(self, stop_at: float) -> None:
        """Sample every second until the client processes have exited (stopping them past
        ``stop_at`` + EXIT_WAIT_S)."""
        while any(p.poll() is None for p in self.clients):
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited ({self.coordinator.returncode}) during the run: "
                                   f"{self.procs.log('coordinator')[-2000:]}")
            if time.time() > stop_at + EXIT_WAIT_S:
                for proc in self.clients:
                    self.procs.terminate(proc)
            started = time.monotonic()
            self.sample("run" if time.time() <= stop_at else "stopping")
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    def reports(self) -> dict[str, dict[str, Any]]:
        """What each client did (scale_clients.py's reports), by client id."""
        out: dict[str, dict[str, Any]] = {}
        for index in range(len(self.clients)):
            path = self.workdir / f"clients-{index}.json"
            if not path.exists():
                raise RuntimeError(f"client process {index} wrote no report: "
                                   f"{self.procs.log(f'clients-{index}')[-2000:]}")
            report = json.loads(path.read_text())
            for client_id, client in report["clients"].items():
                out[client_id] = {**client, "process": index, "peak_rss_bytes": report["peak_rss_bytes"]}
        return out

    def drain(self, confirmed: int, timeout_s: float) -> bool:
        """Sample until the coordinator settled ``confirmed`` deltas (its status) and the queue is
        empty, or ``timeout_s``; True if it did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = self.sample("drain")
            if (row["applied"] or 0) + (row["rejected"] or 0) >= confirmed and row["depth"] == 0:
                return True
            time.sleep(1.0)
        return False

    def stop_coordinator(self) -> dict[str, Any]:
        """Its /metrics and peak RSS, then a clean stop (its last commit), then the oracle's
        entries: the applied log that its checkpoint covers."""
        metrics = scrape(self.port)
        peak = memory_bytes(self.coordinator.pid, "VmHWM")
        code = self.procs.terminate(self.coordinator, timeout_s=300)
        if code != 0:
            raise RuntimeError(f"the coordinator exited {code} on SIGTERM: "
                               f"{self.procs.log('coordinator')[-2000:]}")
        return {"metrics": metrics, "peak_rss_bytes": peak, "entries": read_committed(self.checkpoint)}

    def close(self) -> None:
        try:
            self.procs.stop_all()
        finally:
            try:
                delete_run(self.redis, ConnectionSettings(amqp_url=AMQP_URL), self.run, force=True)
            finally:
                self.redis.close()
                shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------- the two modes
def many_clients(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    extra = ["--guard", args.guard, "--max-queue-bytes", str(args.max_queue_bytes),
             "--commit-max-share", str(args.commit_max_share)]
    with ServedRun(model=args.model_size, extra=extra, workdir=workdir, start_timeout_s=180,
                   lifetime_s=args.seconds + args.drain + BACKSTOP_S) as served:
        per = [args.clients // args.processes + (1 if i < args.clients % args.processes else 0)
               for i in range(args.processes)]
        client_args = ["--codec", args.codec, "--interval", str(args.interval), "--seed", str(args.seed),
                       *(["--fetch-snapshots"] if args.fetch_snapshots else [])]
        start_at, stop_at = served.start_clients([(n, client_args) for n in per], seconds=args.seconds)
        served.follow(stop_at)
        reports = served.reports()
        confirmed = sum(len(r["confirmed"]) for r in reports.values())
        drained = served.drain(confirmed, args.drain)
        end = served.stop_coordinator()
    measured = window(served.samples, start_at + args.warmup, stop_at)
    body = delta_bytes(served.manifest, args.codec)
    shares = cpu_shares(measured)
    coordinator_rss = [s["coordinator_rss"] for s in measured if s["coordinator_rss"]]
    # each client process's median RSS over the window (its peak: VmHWM, in its report)
    process_rss = [[s["clients_rss"][i] for s in measured if s["clients_rss"][i]]
                   for i in range(args.processes)]
    uploads = sorted(u for r in reports.values() for u in r["upload_s"])
    commits, commit_s = metric_mean(end["metrics"], "asyncloco_commit_seconds")
    return {
        "model": args.model_size, "params_m": round(served.manifest.total_bytes / 4 / 1e6, 2),
        "codec": args.codec, "delta_mb": round(body / MB, 2), "clients": args.clients,
        "processes": args.processes, "interval_s": args.interval, "seconds": args.seconds,
        "measured_s": round(measured[-1]["wall"] - measured[0]["wall"], 1) if measured else 0.0,
        "guard": args.guard, "commit_max_share": args.commit_max_share,
        "offered_per_s": round(args.clients / args.interval, 1),
        "applied_per_s": round(applied_per_s(measured), 2),
        "confirmed_per_s": round(confirmed / args.seconds, 2),
        **oracle_figures(reports, end["entries"]), "drained": drained,
        **queue_figures(measured, args.max_queue_bytes / body),
        "coordinator_cpu_median": round(median(shares) or 0.0, 2),
        "coordinator_cpu_max": round(max(shares, default=0.0), 2),
        "coordinator_rss_median_mb": mb(median(coordinator_rss)),
        "coordinator_rss_max_mb": mb(max(coordinator_rss, default=None)),
        "coordinator_peak_mb": mb(end["peak_rss_bytes"]),
        "client_process_rss_median_mb": mb(max((median(p) or 0 for p in process_rss), default=None)),
        "client_process_peak_mb": mb(max((r["peak_rss_bytes"] for r in reports.values()), default=None)),
        "waiting_share": waiting_share(reports, args.seconds),
        "upload_s_median": round(median(uploads) or 0.0, 3),
        "upload_s_p95": round(uploads[int(0.95 * (len(uploads) - 1))], 3) if uploads else 0.0,
        "commits": commits, "commit_s": commit_s, "series": served.samples,
    }


def large_model(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    extra = ["--guard", args.guard, "--max-queue-bytes", str(args.max_queue_bytes), "--no-dylu",
             "--commit-max-share", str(args.commit_max_share)]
    with ServedRun(model="large", extra=extra, workdir=workdir, start_timeout_s=900,
                   lifetime_s=args.seconds + args.drain + 900 + BACKSTOP_S) as served:
        client_args = ["--codec", args.codec, "--interval", str(args.interval), "--seed", str(args.seed),
                       "--variants", "1"]
        groups = [(1, [*client_args, *(["--fetch-snapshots"] if i == 0 else [])])
                  for i in range(args.large_clients)]
        start_at, stop_at = served.start_clients(groups, seconds=args.seconds)
        served.follow(stop_at)
        reports = served.reports()
        confirmed = sum(len(r["confirmed"]) for r in reports.values())
        drained = served.drain(confirmed, args.drain)
        end = served.stop_coordinator()
    fp32 = served.manifest.total_bytes
    body = delta_bytes(served.manifest, args.codec)
    run = window(served.samples, start_at, stop_at)
    coordinator_rss = [s["coordinator_rss"] for s in run if s["coordinator_rss"]]
    fetcher = next(r for r in reports.values() if r["process"] == 0)
    senders = [r for r in reports.values() if r["process"] != 0]
    sender_peak = max((r["peak_rss_bytes"] for r in senders), default=None)
    commits, commit_s = metric_mean(end["metrics"], "asyncloco_commit_seconds")
    _, publish_s = metric_mean(end["metrics"], "asyncloco_snapshot_publish_seconds")
    _, apply_s = metric_mean(end["metrics"], "asyncloco_delta_apply_seconds")
    figures = oracle_figures(reports, end["entries"])
    return {
        "model": "large", "params_m": round(fp32 / 4 / 1e6, 1), "fp32_mb": round(fp32 / MB, 1),
        "codec": args.codec, "delta_mb": round(body / MB, 1), "parts": -(-body // PART_BYTES),
        "clients": args.large_clients, "interval_s": args.interval, "seconds": args.seconds,
        "guard": args.guard, "commit_max_share": args.commit_max_share,
        "applied_per_s": round(applied_per_s(run), 3),
        **{k: figures[k] for k in ("confirmed", "applied", "rejected", "rejected_by_reason", "duplicates",
                                   "lost", "doubled", "unexpected", "client_errors")},
        "drained": drained,
        "coordinator_rss_median_mb": mb(median(coordinator_rss)),
        "coordinator_rss_x_fp32": round((median(coordinator_rss) or 0) / fp32, 2),
        "coordinator_peak_mb": mb(end["peak_rss_bytes"]),
        "coordinator_peak_x_fp32": round((end["peak_rss_bytes"] or 0) / fp32, 2),
        "fetching_client_peak_mb": mb(fetcher["peak_rss_bytes"]),
        "fetching_client_x_fp32": round(fetcher["peak_rss_bytes"] / fp32, 2),
        "sending_client_peak_mb": mb(sender_peak),
        "sending_client_x_fp32": round((sender_peak or 0) / fp32, 2),
        "waiting_share": waiting_share(reports, args.seconds), "fetches": len(fetcher["fetch_s"]),
        "fetch_s_median": round(median(fetcher["fetch_s"]) or 0.0, 2),
        "upload_s_median": round(median([u for r in reports.values() for u in r["upload_s"]]) or 0.0, 2),
        "apply_s": apply_s, "commits": commits, "commit_s": commit_s, "publish_s": publish_s,
        "series": served.samples,
    }


# ---------------------------------------------------------------- the report
def print_rows(pairs: list[tuple[str, Any]]) -> None:
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        print(f"  {name:<{width}}  {value}")


def report(row: dict[str, Any], args: argparse.Namespace) -> None:
    series = row.pop("series")
    start = series[0]["wall"] if series else 0.0
    write_rows(args.csv, [row])
    write_rows(args.csv.with_name(args.csv.stem + "_series.csv"), [
        {"t_s": round(s["wall"] - start, 1), "phase": s["phase"], "version": s["version"],
         "applied": s["applied"], "rejected": s["rejected"], "depth": s["depth"],
         "coordinator_rss_mb": mb(s["coordinator_rss"]),
         "clients_rss_mb": mb(sum(r for r in s["clients_rss"] if r))} for s in series])
    if args.large:
        print(f"a {row['params_m']}M-parameter model end to end ({row['fp32_mb']} MB fp32), {row['clients']} "
              f"clients ({row['codec']} deltas of {row['delta_mb']} MB in {row['parts']} parts, one every "
              f"{row['interval_s']:g} s; client 0 fetches every new snapshot whole), {row['seconds']:g} s, "
              f"guard {row['guard']}, MB = 10^6 bytes")
    else:
        print(f"{row['clients']} clients in {row['processes']} processes, one {row['model']} "
              f"({row['params_m']}M) {row['codec']} delta ({row['delta_mb']} MB) "
              f"every {row['interval_s']:g} s each ({row['offered_per_s']}/s offered), {row['seconds']:g} s, "
              f"measured {row['measured_s']} s after {args.warmup:g} s; guard {row['guard']}, MB = 10^6 B")
    print_rows([(k, v) for k, v in row.items() if k not in ("model", "codec", "processes", "guard")])
    if args.large:
        print(f"lost = doubled = 0: {'met' if row['lost'] == row['doubled'] == 0 else 'MISSED'}"
              f"{'' if row['drained'] else ' (the queue did not drain in --drain: counts may be short)'}")
    else:
        starved = "met" if row["starved"] == 0 else f"missed ({row['starved']} got nothing applied)"
        bounded = "met" if row["queue_bounded"] else "missed"
        print(f"queue depth bounded: {bounded}; no client starved: {starved}; "
              f"lost = doubled = 0: {'met' if row['lost'] == row['doubled'] == 0 else 'MISSED'}")
    print(f"wrote {args.csv} and its _series.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="a 100M-parameter model end to end (above)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4, help="client processes (threads within)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds clients send (600; --large 120)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between a client's deltas, ±25%% (3; --large: 10)")
    parser.add_argument("--model-size", default="small", choices=("tiny", "small", "medium", "large"))
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--guard", default="clip", choices=("off", "screen", "clip"))
    parser.add_argument("--commit-max-share", type=float, default=0.25,
                        help="the coordinator's --commit-max-share (1: commits not spaced by their cost)")
    parser.add_argument("--fetch-snapshots", action="store_true", help="clients read each new snapshot whole")
    parser.add_argument("--large-clients", type=int, default=3)
    parser.add_argument("--max-queue-bytes", type=int, default=1024**3, help="the delta queue's bound")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds left out of rates and samples")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds to wait for the queue to drain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=None, help="default results/scale/{scale,large}.csv")
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (120.0 if args.large else 600.0)
    args.interval = args.interval if args.interval is not None else (10.0 if args.large else 3.0)
    args.csv = args.csv or RESULTS / ("large.csv" if args.large else "scale.csv")
    if args.clients < 1 or not 1 <= args.processes <= args.clients or args.large_clients < 1:
        parser.error("--clients, --processes and --large-clients must be >= 1, and --processes <= --clients")
    if args.seconds <= args.warmup or args.interval <= 0 or args.drain < 0:
        parser.error("--seconds must be above --warmup, --interval above 0 and --drain at least 0")
    try:
        get_codec(args.codec)
    except Exception as exc:
        parser.error(str(exc))
    ensure_services()
    # a SIGTERM (timeout, a scheduler) unwinds like Ctrl-C: what this started is stopped and deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("scale: terminated"))
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            row = large_model(args, Path(tmp)) if args.large else many_clients(args, Path(tmp))
    except (RuntimeError, AssertionError) as exc:
        sys.exit(f"scale: {exc}")
    report(row, args)
    print(f"{time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
