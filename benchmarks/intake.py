"""Delta intake throughput: what one coordinator can check and apply, per delta and per second.

In one process, no servers: ``DeltaIntake.handle`` built as a run builds it
(``coordinator.run_state.build_intake``: the admission rules and the outer optimizer's step, eager
Delayed Nesterov by default), on a model of ``--tensors`` flat float32 tensors of 0.5M, 5M and 50M
parameters in all, fed encoded deltas (``shared/codecs.py``: int8, fp16) of ``--clients``
clients, each on the newest version, so that every one is applied; a version is taken after each
round of the clients, as commits would. A delta bigger than one broker message is handed in as
one put together from parts (``parts_of``), as the service does.

Each size and codec runs twice in one process, on a fresh optimizer from the same θ:
``before`` with the value check of before issue 13 (aa84b4a) swapped in (a float64 sum of
squares of the delta, then an ``isfinite`` pass, then |θ| in float64 for every delta), and
``after`` with the intake's own (one float32 pass that is also the finite check, |θ| remembered
while θ is unchanged).
The table gives medians over the deltas (the first one, a warm-up, left out): ms per delta,
deltas/s, MB/s of encoded bodies (1 MB = 10^6 bytes), and where the time goes: the value check
split into |g| (with the finite check, for ``after``), the separate ``isfinite`` pass, |θ|; the
outer optimizer's ``apply``; and the rest (msgpack and codec decode, screen, admission rules,
bookkeeping). ``speedup`` is after's deltas/s over before's.

``--broker``: the same intake end to end instead, commits included: a real coordinator process
(``harness``'s command line, one thread, the tiny (0.45M) or small (4.8M-parameter) model, no rate
limit) fed by ``--publishers`` processes, each sending deltas of the model's shapes with the
client's own uploader (publisher confirms, parts over 8 MiB) as fast as it can, under many
client ids, on the newest version (the queue bounded to 256 MiB: past it the broker refuses
publishes and the uploaders retry). Applied deltas/s and MB/s are read from the coordinator's
status over ``--seconds`` after a warm-up, next to the raw ceiling of the broker for that message
size measured right after (``ceilings.py``: confirmed publishes by the same number of processes,
and one consumer, the smaller of the two); where the coordinator's wall time goes, from its own
/metrics clocks (the intake, commits, the rest), its CPU seconds per second and the machine's idle.

    .venv/bin/python benchmarks/intake.py                   # 3 sizes × int8, fp16 × before, after: ~1 min
    .venv/bin/python benchmarks/intake.py --sizes 5M --codecs int8 --deltas 40
    .venv/bin/python benchmarks/intake.py --broker          # tiny, small × int8, fp16: ~2.5 min
    .venv/bin/python benchmarks/intake.py --broker --models tiny --codecs int8 --delta-queues 1,4
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import torch
from ceilings import PART_BYTES, broker_rows
from served import cpu_seconds, first_snapshot, free_port, scrape
from table_csv import write_rows

from client.uploader import DeltaUploader
from coordinator.config import CoordinatorConfig
from coordinator.identity import AuthMode
from coordinator.intake import DeltaIntake, IntakeConfig
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry, PlanConfig
from coordinator.run_admin import delete_run
from coordinator.run_state import build_intake
from coordinator.warm_start import WarmStart
from harness.faults import coordinator_args, status
from harness.processes import AMQP_URL, REDIS_URL, Processes, new_run_name, wait_for
from shared.codecs import get_codec
from shared.error_feedback import ErrorFeedback
from shared.errors import ProtocolError
from shared.keys import RunKeys
from shared.protocol import DEFAULT_DELTA_LIMITS, DeltaMessage
from shared.settings import ConnectionSettings, RetryPolicy
from shared.snapshot import SnapshotStore

RUN_ID = "bench-intake"
SIZES = {"0.5M": 500_000, "5M": 5_000_000, "50M": 50_000_000}
# deltas timed per size (after one warm-up): a default run ends in about a minute and a half
DEFAULT_DELTAS = {"0.5M": 60, "5M": 30, "50M": 8}
TARGET_SPEEDUP = 2.0  # issue 13: ≥ 2× today's deltas/s for 5M int8
Stages = dict[str, float]


ValueCheck = Callable[[dict[str, torch.Tensor]], tuple[float, float]]


def old_value_check(intake: DeltaIntake, stages: Stages) -> ValueCheck:
    """The value check of aa84b4a (before issue 13), as one function the intake calls in place of
    its own, timed by part: a float64 Σg², an isfinite pass over every tensor, |θ| in float64 for
    every delta."""

    def check(delta: dict[str, torch.Tensor]) -> tuple[float, float]:
        started = time.perf_counter()
        sq = sum(float(t.double().pow(2).sum()) for t in delta.values())
        squared = time.perf_counter()
        finite = all(bool(torch.isfinite(t).all()) for t in delta.values())
        stages["finite"] += time.perf_counter() - squared
        if not math.isfinite(sq) or not finite:
            raise ProtocolError("non_finite", "NaN or Inf in the delta")
        theta_started = time.perf_counter()
        model_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in intake.params.values()))
        stages["theta"] += time.perf_counter() - theta_started
        if math.sqrt(sq) > intake.config.max_norm_ratio * model_norm:
            raise ProtocolError("norm_too_large", f"|g| = {math.sqrt(sq):.3g}")
        stages["check"] += time.perf_counter() - started
        return sq, model_norm

    return check


def timed(stage: str, stages: Stages, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[stage] += time.perf_counter() - started

    return run


def build(theta: dict[str, torch.Tensor], strategy: str, local_steps: int) -> DeltaIntake:
    """An intake as coordinator/run_state.py builds one, on a copy of ``theta``."""
    config = CoordinatorConfig(
        auth=AuthMode.OPEN, outer=OuterConfig(strategy=strategy),
        intake=IntakeConfig(max_deltas_per_minute=0),  # no rate limit: the benchmark floods
        plan=PlanConfig(local_steps=local_steps),
    )
    optimizer = make_outer_optimizer(theta, config.outer)  # copies θ
    progress = RunProgress()
    return build_intake(config, optimizer=optimizer, registry=ClientRegistry(config.plan), progress=progress,
                        warm=WarmStart(0, progress=progress), barrier=None, run_id=RUN_ID)


class Timed:
    """One variant's intake, its stages timed per delta."""

    def __init__(self, theta: dict[str, torch.Tensor], variant: str, strategy: str, local_steps: int) -> None:
        self.intake = intake = build(theta, strategy, local_steps)
        intake.take_version(1)
        self.stages: Stages = defaultdict(float)
        if variant == "before":
            intake._check_values = old_value_check(intake, self.stages)  # type: ignore[method-assign,assignment]
        else:
            intake._check_values = timed("check", self.stages, intake._check_values)  # type: ignore[method-assign]
            intake._model_sq = timed("theta", self.stages, intake._model_sq)  # type: ignore[method-assign]
        intake.apply = timed("apply", self.stages, intake.apply)
        self.per_delta: list[Stages] = []

    def handle(self, body: bytes, *, now: float, parts_of: tuple[str, int] | None) -> None:
        self.stages.clear()
        started = time.perf_counter()
        outcome = self.intake.handle(body, now=now, parts_of=parts_of)
        total = time.perf_counter() - started
        if outcome.kind.value != "applied":
            raise SystemExit(f"a delta was not applied: {outcome.reason} ({outcome.detail})")
        self.per_delta.append({"total": total, "bytes": float(len(body)), **self.stages})


def measure(theta: dict[str, torch.Tensor], payloads: list[dict[str, bytes]], codec: str, *,
            variants: list[str], deltas: int, clients: int, strategy: str) -> dict[str, list[Stages]]:
    """Per variant and delta: seconds in all and in each stage, for ``deltas`` + 1 deltas (the first
    a warm-up). The variants take turns delta by delta, so that a noisy neighbour hits them alike."""
    local_steps = 30
    runs = {variant: Timed(theta, variant, strategy, local_steps) for variant in variants}
    version = 1
    for i in range(deltas + 1):
        client, seq = f"c{i % clients}", i // clients
        body = DeltaMessage(run_id=RUN_ID, client_id=client, seq=seq, base_version=version,
                            local_steps=local_steps, samples=local_steps * 8, tokens=local_steps * 8 * 512,
                            compute_s=1.0, train_loss=2.0, codec=codec,
                            tensors=payloads[i % len(payloads)]).encode()
        # an assembled delta (sent in parts) is judged under the limits of a whole delta
        parts_of = (client, seq) if len(body) > DEFAULT_DELTA_LIMITS.max_message_bytes else None
        for run in runs.values():
            run.handle(body, now=1000.0 + i, parts_of=parts_of)
        if (i + 1) % clients == 0:
            version += 1  # a commit: every client may send on the new version
            for run in runs.values():
                run.intake.take_version(version)
    return {variant: run.per_delta[1:] for variant, run in runs.items()}


# ---------------------------------------------------------------- through the broker
BROKER_MODELS = {"tiny": "0.45M", "small": "4.8M"}  # the bytelm sizes a coordinator can serve
BROKER_STEPS = 6  # the --local-steps of harness.faults.coordinator_args
QUEUE_BYTES = 256 * 1024 * 1024  # the queue's bound: past it the broker refuses publishes (backpressure)
# the coordinator's own clocks (/metrics): seconds in the intake (applied deltas), commits, publishes
CLOCKS = {"intake": "asyncloco_delta_apply_seconds", "commit": "asyncloco_commit_seconds",
          "publish": "asyncloco_snapshot_publish_seconds"}


def broker_message(run_id: str, client_id: str, seq: int, version: int, codec: str,
                   tensors: dict[str, bytes]) -> DeltaMessage:
    return DeltaMessage(run_id=run_id, client_id=client_id, seq=seq, base_version=version,
                        local_steps=BROKER_STEPS, samples=48, tokens=48 * 128, compute_s=1.0, train_loss=2.0,
                        codec=codec, tensors=tensors)


def publish_deltas(run: str, run_id: str, index: int, ids: int, payloads: list[dict[str, bytes]], codec: str,
                   queues: int, start: Any, stop: Any, confirmed: Any) -> None:
    """One publisher process: deltas under ``ids`` client ids in turn, each on the newest version
    (an id waits for a version newer than its last base: one delta per base), sent as a client
    sends them, until ``stop``; ``confirmed`` counts the confirmed ones."""
    keys = RunKeys(run)
    # a full queue (the coordinator behind) refuses publishes and the uploader retries: expected here
    logging.getLogger("client.uploader").setLevel(logging.ERROR)
    uploader = DeltaUploader(ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL), keys=keys,
                             retry=RetryPolicy(max_delay_s=1.0), part_bytes=PART_BYTES)
    client = redis.Redis.from_url(REDIS_URL)
    last_base = {f"p{index}-{i}": -1 for i in range(ids)}
    seqs = dict.fromkeys(last_base, 0)
    try:
        uploader.connect()
        start.wait()
        while not stop.is_set():
            version = int(client.get(keys.current) or 0)
            name = next((n for n, base in last_base.items() if base < version), None)
            if name is None:
                time.sleep(0.005)
                continue
            message = broker_message(run_id, name, seqs[name], version, codec, payloads[seqs[name] % 2])
            uploader.queue = keys.delta_queue_for(name, queues)  # as the worker routes by the plan
            if uploader.send(message, give_up=stop.is_set).confirmed:
                with confirmed.get_lock():
                    confirmed.value += 1
            last_base[name], seqs[name] = version, seqs[name] + 1
    finally:
        uploader.close()
        client.close()


def _sample(run: str, pid: int, port: int, confirmed: Any) -> dict[str, Any]:
    """The coordinator's applied count (at its status document's time), its clocks and CPU
    seconds, the machine's idle seconds, the publishers' confirmed deltas."""
    doc, tick, metrics = status(run), os.sysconf("SC_CLK_TCK"), scrape(port)
    with open("/proc/stat") as fh:
        machine = [int(v) for v in fh.readline().split()[1:]]  # cpu: user nice system idle iowait ...
    return {"at": float(doc["updated_at"]), "applied": doc["deltas"]["applied"], "doc": doc,
            **{f"{k}_{part}": metrics.get(f"{name}_{part}", 0.0) for k, name in CLOCKS.items()
               for part in ("sum", "count")},
            "cpu_s": cpu_seconds(pid), "idle_s": (machine[3] + machine[4]) / tick,
            "wall": time.time(), "confirmed": confirmed.value}


def through_broker(model: str, codec: str, *, publishers: int, ids: int, seconds: float, warmup_s: float,
                   workdir: Path, queues: int = 1) -> dict[str, Any]:
    """One row: a real coordinator serving ``model``, fed by ``publishers`` processes."""
    run = new_run_name("bench-intake")
    (workdir / run).mkdir(parents=True)
    procs, client, port = Processes(workdir / run), redis.Redis.from_url(REDIS_URL), free_port()
    context = multiprocessing.get_context("fork")  # the children only publish: no torch
    start, stop, confirmed = context.Event(), context.Event(), context.Value("i", 0)
    workers: list[Any] = []
    try:
        coordinator = procs.start("coordinator", *coordinator_args(
            run, workdir / run / "checkpoint", "--model-size", model, "--max-deltas-per-minute", "0",
            "--max-staleness", "1000000", "--eval-interval", "3600", "--no-dylu",
            "--max-queue-bytes", str(QUEUE_BYTES), "--metrics-port", str(port),
            "--delta-queues", str(queues)))
        snapshot = wait_for(lambda: first_snapshot(SnapshotStore(client, RunKeys(run))), timeout_s=120,
                            what="the coordinator's first snapshot")
        assert snapshot is not None
        run_id, generator = snapshot.manifest.run_id, torch.Generator().manual_seed(0)
        grads = {n: torch.randn(p.shape, generator=generator) * 1e-4 for n, p in snapshot.params.items()}
        payloads = [{n: ErrorFeedback(get_codec(codec)).encode(n, sign * g) for n, g in grads.items()}
                    for sign in (1.0, -1.0)]
        body_bytes = len(broker_message(run_id, "p0-0", 0, 0, codec, payloads[0]).encode())
        workers = [context.Process(target=publish_deltas,
                                   args=(run, run_id, i, ids, payloads, codec, queues, start, stop,
                                         confirmed))
                   for i in range(publishers)]
        for worker in workers:
            worker.start()
        start.set()
        time.sleep(warmup_s)
        first = _sample(run, coordinator.pid, port, confirmed)
        time.sleep(seconds)
        last = _sample(run, coordinator.pid, port, confirmed)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
        procs.stop_all()
        try:
            delete_run(client, ConnectionSettings(amqp_url=AMQP_URL), run, force=True)
        finally:
            client.close()
            shutil.rmtree(workdir / run, ignore_errors=True)
    # the raw ceiling for this message size (bigger deltas go in parts of --part-bytes), right after
    raw = broker_rows(AMQP_URL, new_run_name("bench-ceilings"), mb=48.0, repeats=3, publishers=[publishers],
                      timeout_s=60.0, sizes={"delta": min(body_bytes, PART_BYTES)})
    ceiling = min(r["mb_per_s"] for r in raw)
    wall = last["wall"] - first["wall"]
    applied = (last["applied"] - first["applied"]) / (last["at"] - first["at"])  # the status's own clock
    spent = {k: last[f"{k}_sum"] - first[f"{k}_sum"] for k in CLOCKS}
    counted = {k: max(1.0, last[f"{k}_count"] - first[f"{k}_count"]) for k in CLOCKS}
    deltas = last["doc"]["deltas"]
    return {
        "model": model, "params": BROKER_MODELS[model], "codec": codec, "queues": queues,
        "publishers": publishers,
        "client_ids": publishers * ids, "body_mb": round(body_bytes / 1e6, 3), "seconds": round(wall, 1),
        "applied_per_s": round(applied, 2), "applied_mb_per_s": round(applied * body_bytes / 1e6, 1),
        "confirmed_per_s": round((last["confirmed"] - first["confirmed"]) / wall, 2),
        "broker_ceiling_mb_per_s": ceiling,
        "share_of_ceiling": round(applied * body_bytes / 1e6 / ceiling, 3),
        "queue_depth_end": last["doc"]["queue"]["depth"], "rejected": deltas["rejected"],
        "rejected_by_reason": " ".join(f"{k}={v}" for k, v in deltas["rejected_by_reason"].items()),
        "intake_ms_per_delta": round(1000 * spent["intake"] / counted["intake"], 2),
        "commits_per_s": round(counted["commit"] / wall, 2),
        "commit_ms": round(1000 * spent["commit"] / counted["commit"], 1),
        **{f"{k}_share": round(spent[k] / wall, 3) for k in CLOCKS},
        # parts spooled to disk and put together, the loop, waiting: outside both clocks
        "other_share": round(1 - (spent["intake"] + spent["commit"]) / wall, 3),
        "coordinator_cpu": round((last["cpu_s"] - first["cpu_s"]) / wall, 2),
        "machine_idle": round((last["idle_s"] - first["idle_s"]) / wall / (os.cpu_count() or 1), 2),
    }


def broker_main(args: argparse.Namespace, models: list[str], codecs: list[str]) -> None:
    started = time.perf_counter()
    print(f"intake through RabbitMQ into one coordinator process (one thread), {args.publishers} "
          f"publishers, {args.seconds:g} s after {args.warmup:g} s of warm-up; MB = 10^6 bytes")
    columns = [("model", "model", "<6"), ("params", "params", ">6"), ("codec", "codec", "<5"),
               ("queues", "queues", ">6"),
               ("body_mb", "MB", ">6.2f"), ("applied_per_s", "applied/s", ">9.1f"),
               ("applied_mb_per_s", "MB/s", ">6.1f"), ("broker_ceiling_mb_per_s", "ceiling", ">7.1f"),
               ("share_of_ceiling", "share", ">6.0%"), ("confirmed_per_s", "sent/s", ">7.1f"),
               ("queue_depth_end", "depth", ">6"), ("intake_ms_per_delta", "ms/delta", ">8.1f"),
               ("intake_share", "intake", ">6.0%"), ("commit_share", "commit", ">6.0%"),
               ("other_share", "other", ">5.0%"),
               ("coordinator_cpu", "CPU", ">5.0%"), ("machine_idle", "idle", ">5.0%")]
    print(" ".join(f"{title:{spec[:2]}}" for _, title, spec in columns))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        for model in models:
            for codec in codecs:
                for queues in args.delta_queues:
                    row = through_broker(model, codec, publishers=args.publishers, ids=args.ids,
                                         seconds=args.seconds, warmup_s=args.warmup, workdir=Path(tmp),
                                         queues=queues)
                    rows.append(row)
                    print(" ".join(f"{row[key]:{spec}}" for key, _, spec in columns), flush=True)
    print("ceiling: confirmed publishes by as many processes, or one consumer, whichever is slower, for a "
          "message of the delta's size (8 MiB parts for bigger ones); intake, commit, other (parts, the "
          "loop, waiting): shares of the coordinator's wall time; CPU: its CPU seconds per second; "
          "idle: the machine's")
    for row in rows:
        verdict = "met" if row["share_of_ceiling"] >= 0.8 else "missed"
        print(f"target applied MB/s ≥ 80% of the broker ceiling, {row['model']} {row['codec']}: "
              f"{row['share_of_ceiling']:.0%} ({verdict})")
    write_rows(args.csv, rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.csv}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--codecs", default="int8,fp16")
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--deltas", type=int, default=0, help="deltas timed per run (0: by size, 60/30/8)")
    parser.add_argument("--tensors", type=int, default=4, help="tensors the model is cut into")
    parser.add_argument("--clients", type=int, default=8,
                        help="senders; a version is taken after each round of them")
    parser.add_argument("--strategy", default="edn", help="outer strategy (edn: the coordinator's default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady figures on a shared machine; 0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broker", action="store_true", help="end to end through RabbitMQ (see above)")
    parser.add_argument("--models", default=",".join(BROKER_MODELS), help="--broker: bytelm model sizes")
    parser.add_argument("--publishers", type=int, default=4, help="--broker: publisher processes")
    parser.add_argument("--ids", type=int, default=16, help="--broker: client ids per publisher")
    parser.add_argument("--seconds", type=float, default=15.0, help="--broker: seconds measured per row")
    parser.add_argument("--warmup", type=float, default=6.0, help="--broker: seconds before measuring")
    parser.add_argument("--delta-queues", default="1",
                        help="--broker: comma list of the coordinator's --delta-queues, a row each")
    parser.add_argument("--csv", type=Path, default=None,
                        help="default results/intake/intake.csv (--broker: intake_broker.csv)")
    args = parser.parse_args()
    if args.csv is None:
        args.csv = Path("results/intake") / ("intake_broker.csv" if args.broker else "intake.csv")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not sizes or set(sizes) - set(SIZES):
        parser.error(f"--sizes takes a comma list of {', '.join(SIZES)}")
    if not variants or set(variants) - {"before", "after"}:
        parser.error("--variants takes a comma list of before, after")
    for codec in codecs:
        get_codec(codec)
    if args.broker:
        try:
            args.delta_queues = [int(q) for q in args.delta_queues.split(",") if q.strip()]
        except ValueError:
            parser.error("--delta-queues takes a comma list of counts")
        if not args.delta_queues or min(args.delta_queues) < 1:
            parser.error("--delta-queues takes a comma list of counts >= 1")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models or set(models) - set(BROKER_MODELS) or args.publishers < 1 or args.ids < 1:
            parser.error(f"--models takes a comma list of {', '.join(BROKER_MODELS)}; "
                         "--publishers and --ids must be >= 1")
        broker_main(args, models, codecs)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"intake of one process, torch {torch.__version__} on {torch.get_num_threads()} threads, strategy "
          f"{args.strategy}, {args.tensors} tensors, {args.clients} clients; medians over the deltas")
    header = (f"{'params':>6} {'codec':<5} {'variant':<7} {'MB':>6} {'n':>3} {'ms/delta':>9} {'deltas/s':>9} "
              f"{'MB/s':>7} {'|g|':>7} {'finite':>7} {'|θ|':>7} {'apply':>7} {'rest':>7} {'speedup':>7}")
    print(header)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        numel = SIZES[size]
        generator = torch.Generator().manual_seed(args.seed)
        shapes = [numel // args.tensors + (1 if i < numel % args.tensors else 0) for i in range(args.tensors)]
        theta = {f"layer{i}.weight": torch.randn(n, generator=generator) * 0.02 for i, n in enumerate(shapes)}
        grads = {name: torch.randn(p.shape, generator=generator) * 1e-3 for name, p in theta.items()}
        deltas = args.deltas or DEFAULT_DELTAS[size]
        for codec in codecs:
            # two payloads of opposite sign, alternated, so that θ wanders but does not drift
            payloads = [{name: ErrorFeedback(get_codec(codec)).encode(name, sign * g)
                         for name, g in grads.items()} for sign in (1.0, -1.0)]
            rates: dict[str, float] = {}
            measured = measure(theta, payloads, codec, variants=variants, deltas=deltas,
                               clients=args.clients, strategy=args.strategy)
            for variant, per_delta in measured.items():
                row = summarize(size, codec, variant, per_delta)
                rates[variant] = row["deltas_per_s"]
                if variant == "after" and "before" in rates:
                    row["speedup"] = round(rates["after"] / rates["before"], 2)
                rows.append(row)
                print(f"{size:>6} {codec:<5} {variant:<7} {row['body_mb']:>6.1f} {row['deltas']:>3} "
                      f"{row['ms_per_delta']:>9.1f} {row['deltas_per_s']:>9.1f} {row['mb_per_s']:>7.1f} "
                      f"{row['g_ms']:>7.1f} {row['finite_ms']:>7.1f} {row['theta_ms']:>7.1f} "
                      f"{row['apply_ms']:>7.1f} {row['rest_ms']:>7.1f} "
                      f"{(str(row['speedup']) + '×') if row['speedup'] != '' else '':>7}", flush=True)
    print("stage columns in ms per delta; |g| of 'after' includes its finite check (one pass)")
    for row in rows:
        if row["params"] == "5M" and row["codec"] == "int8" and row["speedup"] != "":
            verdict = "met" if row["speedup"] >= TARGET_SPEEDUP else "missed"
            print(f"target ≥ {TARGET_SPEEDUP:g}× deltas/s for 5M int8: {row['speedup']}× ({verdict})")
    write_rows(args.csv, rows)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.csv}")


def summarize(size: str, codec: str, variant: str, per_delta: list[Stages]) -> dict[str, Any]:
    """One table row: medians of the per-delta figures (each stage's own median, so they need not
    add up to the total exactly)."""

    def ms(key: str) -> float:
        return round(1000 * statistics.median(d.get(key, 0.0) for d in per_delta), 2)

    total = statistics.median(d["total"] for d in per_delta)
    body_mb = statistics.median(d["bytes"] for d in per_delta) / 1e6
    check = [d.get("check", 0.0) for d in per_delta]
    g = [c - d.get("theta", 0.0) - d.get("finite", 0.0) for c, d in zip(check, per_delta, strict=True)]
    rest = [d["total"] - d.get("check", 0.0) - d.get("apply", 0.0) for d in per_delta]
    return {
        "params": size, "codec": codec, "variant": variant, "deltas": len(per_delta),
        "body_mb": round(body_mb, 3), "ms_per_delta": round(1000 * total, 2),
        "deltas_per_s": round(1 / total, 2), "mb_per_s": round(body_mb / total, 1),
        "check_ms": ms("check"), "g_ms": round(1000 * statistics.median(g), 2), "finite_ms": ms("finite"),
        "theta_ms": ms("theta"), "apply_ms": ms("apply"), "rest_ms": round(1000 * statistics.median(rest), 2),
        "speedup": "",
    }


if __name__ == "__main__":
    main()
