"""Real processes: asynchronous runs against synchronous DiLoCo and the fastest client alone.

Starts the real coordinator and 4 real clients (``--slowdown 1,2,4,8``) on the real Redis and
RabbitMQ, once per variant, each for ``--seconds`` of training, and prints the global model's eval
loss at equal wall-clock points; writes a CSV. Every process it starts is stopped by pid. Variants:

* ``edn``: the coordinator's defaults (eager Delayed Nesterov, compute weights p = 1, DyLU);
* ``dn``: the paper's Delayed Nesterov + DyLU (``--strategy dn --compute-exponent 0``);
* ``sync``: synchronous DiLoCo (every round waits for all four);
* ``alone``: the fastest client (slowdown 1) alone, with the defaults: do the volunteers help?
* ``plain``, ``follow``, ``overlap+follow``, ``no-grace`` (not run unless named): the clients
  without their defaults ``--overlap --follow`` (rounds that start before their last delta is in
  a snapshot, and move onto newer snapshots while they train), with ``--follow`` alone, with both
  named; and the defaults with the coordinator's grace period off (``--grace-rounds 0``).
* ``flip``, ``flip-warm``, ``flip-unguarded``, ``honest3`` (not run unless named): the fastest
  client lies, sending its honest delta times −1 every round (``harness/attacker.py``), with the
  guard at its defaults, with a trusted warm start first (``--warm-start-steps`` of one round by
  ``x2``, as docs/SECURITY.md advises for a run open to strangers), and with ``--guard off``;
  ``honest3`` is the clean run at equal honest compute (the three honest clients alone), and
  ``honest3-busy`` the same with the liar's load on this machine: ``x1`` trains as the liar
  does, but sends its delta times 100, which the intake refuses before the guard sees it. The
  damage, printed against each of the two that ran, is the liar's run's loss above the clean
  run's as a share of the clean run's improvement, as ``attacks.py`` counts it.
* ``edn-cap``, ``flip-cap``, ``flip-warm-cap`` (not run unless named): ``edn``, ``flip`` and
  ``flip-warm`` with ``--weight-cap 0.5`` (no client weighs more than half the others together);
  ``edn-distrust``, ``flip-distrust``, ``flip-warm-distrust`` the same with ``--guard-distrust``
  (the default since 4a0d65d: they name it), and ``edn-trusting``, ``flip-trusting``,
  ``flip-warm-trusting`` with ``--no-guard-distrust`` (each run also prints how many deltas the
  guard tried on the operator's data, and let in).

``--repeats N`` runs each variant N times (the table shows each point's mean) and prints, per run,
the deltas applied, the guard's refusals by reason and the speeds the coordinator measured.

    python benchmarks/real_vs_sync.py --seconds 120
    python benchmarks/real_vs_sync.py --variants plain,overlap+follow,no-grace --repeats 2
    python benchmarks/real_vs_sync.py --variants honest3,flip,flip-warm,flip-unguarded --seconds 180
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from table_csv import write_rows

from coordinator.run_admin import delete_run
from shared.keys import RunKeys
from shared.settings import ConnectionSettings
from shared.signing import KEY_FILE_NAME, SigningKey

ROOT = Path(__file__).resolve().parent.parent
SLOWDOWNS = (1, 2, 4, 8)
# label -> (coordinator options, client slowdowns, client options)
VARIANTS: dict[str, tuple[list[str], tuple[int, ...], list[str]]] = {
    "edn": ([], SLOWDOWNS, []),
    "dn": (["--strategy", "dn", "--compute-exponent", "0"], SLOWDOWNS, []),
    "sync": (["--strategy", "sync"], SLOWDOWNS, []),
    "alone": ([], SLOWDOWNS[:1], []),
    # since 795796c the client's defaults are --overlap --follow: "edn" runs them; these name them
    "plain": ([], SLOWDOWNS, ["--no-overlap", "--no-follow"]),
    "follow": ([], SLOWDOWNS, ["--no-overlap", "--follow"]),
    "overlap+follow": ([], SLOWDOWNS, ["--overlap", "--follow"]),
    "no-grace": (["--grace-rounds", "0"], SLOWDOWNS, []),
    "honest3": ([], SLOWDOWNS[1:], []),
    "honest3-busy": ([], SLOWDOWNS, []),
    "flip": ([], SLOWDOWNS, []),
    "flip-warm": (["--warm-start-steps", "30", "--warm-start-client", "x2"], SLOWDOWNS, []),
    "flip-unguarded": (["--guard", "off"], SLOWDOWNS, []),
    "edn-cap": (["--weight-cap", "0.5"], SLOWDOWNS, []),
    "flip-cap": (["--weight-cap", "0.5"], SLOWDOWNS, []),
    "flip-warm-cap": (["--weight-cap", "0.5", "--warm-start-steps", "30", "--warm-start-client", "x2"],
                      SLOWDOWNS, []),
    "edn-distrust": (["--guard-distrust"], SLOWDOWNS, []),
    "flip-distrust": (["--guard-distrust"], SLOWDOWNS, []),
    "flip-warm-distrust": (["--guard-distrust", "--warm-start-steps", "30", "--warm-start-client", "x2"],
                           SLOWDOWNS, []),
    "edn-trusting": (["--no-guard-distrust"], SLOWDOWNS, []),
    "flip-trusting": (["--no-guard-distrust"], SLOWDOWNS, []),
    "flip-warm-trusting": (["--no-guard-distrust", "--warm-start-steps", "30", "--warm-start-client", "x2"],
                           SLOWDOWNS, []),
}
DEFAULT_VARIANTS = ("edn", "dn", "sync", "alone")
# variant -> k: its fastest client (slowdown 1) sends its honest delta times -k (harness/attacker.py)
LIARS = {"flip": 1.0, "flip-warm": 1.0, "flip-unguarded": 1.0, "flip-cap": 1.0, "flip-warm-cap": 1.0,
         "flip-distrust": 1.0, "flip-warm-distrust": 1.0, "flip-trusting": 1.0, "flip-warm-trusting": 1.0,
         # x1 sends its delta times 100, which the intake's absolute bound (|g| ≤ |θ|) refuses
         # before the guard: it loads the machine as the liar does, and none of its work counts
         # (times 1000 or more overflowed the int3 codec's fp16 scales with the error feedback's
         # residual, and the client ended with that error in its second round)
         "honest3-busy": -100.0}
BASELINES = ("honest3", "honest3-busy")  # the clean runs that damage is measured against
LIAR_ID = "x1"


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


class BenchRun:
    """One run on the real servers: its coordinator and clients as processes (stopped by pid on
    exit), its keys deleted afterwards. Also used by benchmarks/rejoin.py."""

    def __init__(self, name: str, args: argparse.Namespace, workdir: Path) -> None:
        self.run = f"bench-{name.replace('+', '-')}-{uuid.uuid4().hex[:6]}"
        self.args, self.workdir = args, workdir
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", ASYNCLOCO_REDIS=args.redis,
                        ASYNCLOCO_AMQP=args.amqp)
        self.redis = redis.Redis.from_url(args.redis)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        key_file = workdir / f"{self.run}-{KEY_FILE_NAME}"  # made here, so the clients can pin it
        self.key_file, self.coordinator_key = key_file, SigningKey.load_or_create(key_file).public_hex

    def __enter__(self) -> BenchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.procs)
        for log in self.logs:
            log.close()
        try:
            delete_run(self.redis, ConnectionSettings(amqp_url=self.args.amqp), self.run)  # stopped
        finally:
            self.redis.close()

    def _start(self, label: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{self.run}-{label}.log", "a")  # noqa: SIM115 - closed on exit
        self.logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def coordinator(self, options: list[str], seconds: float) -> subprocess.Popen:
        """Start the coordinator and wait for its first evaluated snapshot."""
        args = self.args
        proc = self._start("coordinator", [
            "coordinator.cli", "serve", "--run", self.run, "--auth", "open", *options,
            "--model-size", "tiny", "--threads", "1",
            "--checkpoint-dir", str(self.workdir / self.run), "--signing-key", str(self.key_file),
            "--local-steps", str(args.local_steps), "--eval-interval", "5",
            "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum),
            "--max-seconds", str(seconds + 120)])
        deadline = time.monotonic() + 120
        while not self.status().get("eval", {}).get("latest"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"coordinator of {self.run} did not come up; see {self.workdir}")
            time.sleep(0.5)
        return proc

    def client(self, client_id: str, slowdown: int, seconds: float,
               options: list[str] | None = None, *, signflip: float = 0.0) -> subprocess.Popen:
        """Start a real client; with ``signflip`` k, one that sends its honest delta times -k."""
        program = ["harness.attacker", "--signflip", str(signflip), "--"] if signflip else ["client.cli"]
        return self._start(client_id, [
            *program, "join", "--run", self.run, "--client-id", client_id,
            "--slowdown", str(slowdown), "--threads", "1", "--device", "cpu",
            "--state-dir", str(self.workdir / "state" / client_id), "--max-seconds", str(seconds),
            "--coordinator-key", self.coordinator_key, *(options or [])])

    def status(self) -> dict:
        """The run's status document, as the coordinator last published it."""
        return _status(self.redis, self.run)

    def curve(self, since: float) -> list[tuple[float, float]]:
        """[(seconds since ``since``, eval loss)] from the run's status."""
        history = self.status()["eval"]["history"]
        return [(h["time"] - since, h["loss"]) for h in history if h["time"] >= since - 1]


def run_one(variant: str, args: argparse.Namespace, workdir: Path) -> tuple[list[tuple[float, float]], dict]:
    """Train ``variant``; return [(seconds since the clients started, eval loss)] and what the run
    did: deltas applied, refusals by reason, the speeds the coordinator measured."""
    options, slowdowns, client_options = VARIANTS[variant]
    with BenchRun(variant, args, workdir) as bench:
        coordinator = bench.coordinator(options, args.seconds)
        started_wall = time.time()
        clients = [bench.client(f"x{slowdown}", slowdown, args.seconds, client_options,
                                signflip=LIARS.get(variant, 0.0) if f"x{slowdown}" == LIAR_ID else 0.0)
                   for slowdown in slowdowns]
        for proc in clients:
            proc.wait(timeout=args.seconds + 120)
        status = bench.status()
        _stop([coordinator])
        deltas = status.get("deltas", {})
        guard = deltas.get("guard", {})
        did = {"applied": deltas.get("applied", 0), "refused": deltas.get("rejected_by_reason", {}),
               "forgiven": guard.get("direction_forgiven", 0),
               "steps_per_s": {c["client_id"]: c.get("steps_per_s", 0.0) for c in status.get("clients", [])},
               "liar": {c["client_id"]: (c.get("updates", 0), c.get("rejected", 0))
                        for c in status.get("clients", []) if variant in LIARS and c["client_id"] == LIAR_ID},
               "clipped": guard.get("clipped", 0),
               # with --guard-distrust: deltas tried on the operator's data, and let in by the trial
               "tried": (guard.get("distrust_tried", 0), guard.get("distrust_cleared", 0)),
               "rejected": {c["client_id"]: c.get("rejected", 0) for c in status.get("clients", [])}}
        return bench.curve(started_wall), did


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
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant (the table: means)")
    parser.add_argument("--points", type=int, default=6, help="equal wall-clock points to compare")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--out", type=Path, default=Path("results/real_vs_sync.csv"))
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy every process's log here at the end (ASYNCLOCO_LOG_LEVEL=debug: the "
                        "guard's cosines, for direction_replay.py)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants takes a comma list of {', '.join(VARIANTS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    curves: dict[str, list[list[tuple[float, float]]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="asyncloco-bench-") as tmp:
        for repeat in range(args.repeats):
            for variant in variants:  # interleaved: a slow spell of the machine hits every variant
                print(f"running {variant} (run {repeat + 1} of {args.repeats}) for {args.seconds:.0f} s with "
                      f"clients at --slowdown {','.join(map(str, VARIANTS[variant][1]))} "
                      f"{' '.join(VARIANTS[variant][2])}...", flush=True)
                curve, did = run_one(variant, args, Path(tmp))
                curves[variant].append(curve)
                speeds = ", ".join(f"{c} {v or 0:.2f}" for c, v in sorted(did["steps_per_s"].items()))
                final = curve[-1][1] if curve else float("nan")
                liar = "".join(f"; the liar's deltas applied {a}, refused {r}"
                               for a, r in did["liar"].values())
                tried, cleared = did["tried"]
                trials = f", tried on trusted data {tried} (let in {cleared})" if tried else ""
                rejected = ", ".join(f"{c} {n}" for c, n in sorted(did["rejected"].items()) if n)
                print(f"  final eval {final:.4f}; applied {did['applied']}, "
                      f"refused {did['refused'] or 'none'} ({rejected or 'none'}), forgiven "
                      f"{did['forgiven']}, clipped {did['clipped']}{trials}; measured steps/s "
                      f"{speeds}{liar}", flush=True)
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                shutil.copy(log, args.keep_logs / log.name)
    points = [args.seconds * (i + 1) / args.points for i in range(args.points)]
    print(f"\n{'wall s':>7} " + " ".join(f"{v:>14}" for v in variants) + "  best"
          + (f"  (means of {args.repeats} runs)" if args.repeats > 1 else ""))
    rows = []
    for t in points:
        losses = {v: _mean([loss_at(c, t) for c in curves[v]]) for v in variants}
        known = {v: x for v, x in losses.items() if x is not None}
        best = min(known, key=lambda v: known[v]) if known else "-"
        rows.append({"wall_s": round(t, 1), **{f"{v}_eval": losses[v] for v in variants}, "best": best})
        shown = (f"{x if x is not None else float('nan'):>14.4f}" for x in losses.values())
        print(f"{t:>7.0f} " + " ".join(shown) + f"  {best}")
    for baseline in BASELINES:
        if baseline in curves:
            print_damage(curves, points[-1], baseline)
    write_rows(args.out, rows)
    print(f"wrote {args.out}")


def print_damage(curves: dict[str, list[list[tuple[float, float]]]], t: float, baseline: str) -> None:
    """Each liar variant's damage at ``t`` against the clean run ``baseline``: its loss above the
    clean run's, as a share of the clean run's improvement from its first evaluation (means over
    the runs)."""
    clean = _mean([loss_at(c, t) for c in curves[baseline]])
    start = _mean([c[0][1] if c else None for c in curves[baseline]])
    if clean is None or start is None or start <= clean:
        return
    for variant in curves:
        if variant in LIARS and variant not in BASELINES:
            loss = _mean([loss_at(c, t) for c in curves[variant]])
            if loss is not None:
                print(f"damage of {variant} at {t:.0f} s: {(loss - clean) / (start - clean):+.1%} "
                      f"({loss:.4f} against {baseline}'s {clean:.4f}, from {start:.4f})")


def _mean(values: list[float | None]) -> float | None:
    """The mean of ``values``, None if any is (a run with no eval by then)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known and len(known) == len(values) else None


if __name__ == "__main__":
    main()
