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

``--broker``: the same intake end to end instead, commits included (``intake_broker.py``): a real
coordinator process (``harness``'s command line, one thread, the tiny (0.45M) or small
(4.8M-parameter) model, no rate limit) fed by ``--publishers`` processes, each sending deltas of
the model's shapes with the client's own uploader (publisher confirms, parts over 8 MiB) as fast
as it can, under many client ids, on the newest version (the queue bounded to 256 MiB: past it the
broker refuses publishes and the uploaders retry). Applied deltas/s and MB/s are read from the
coordinator's status over ``--seconds`` after a warm-up, next to the raw ceiling of the broker for
that message size measured right after (``ceilings.py``: confirmed publishes by the same number of
processes, and one consumer, the smaller of the two); where the coordinator's wall time goes, from
its own /metrics clocks (the intake, commits, the rest), its CPU seconds per second and the machine's idle.

    .venv/bin/python benchmarks/intake.py                   # 3 sizes × int8, fp16 × before, after: ~1 min
    .venv/bin/python benchmarks/intake.py --sizes 5M --codecs int8 --deltas 40
    .venv/bin/python benchmarks/intake.py --broker          # tiny, small × int8, fp16: ~2.5 min
    .venv/bin/python benchmarks/intake.py --broker --models tiny --codecs int8 --delta-queues 1,4
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from intake_broker import BROKER_MODELS, broker_main
from served import honest_payloads
from table_csv import write_rows

from coordinator.config import CoordinatorConfig
from coordinator.identity import AuthMode
from coordinator.intake import DeltaIntake, IntakeConfig
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry, PlanConfig
from coordinator.run_state import build_intake
from coordinator.warm_start import WarmStart
from shared.codecs import get_codec
from shared.errors import ProtocolError
from shared.protocol import DEFAULT_DELTA_LIMITS, DeltaMessage

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
        deltas = args.deltas or DEFAULT_DELTAS[size]
        for codec in codecs:
            # two deltas the guard takes as honest, alternated
            payloads = honest_payloads({name: p.shape for name, p in theta.items()}, codec, scale=1e-3)
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
