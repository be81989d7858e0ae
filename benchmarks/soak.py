"""Soak: the real coordinator and 4 real clients for 30 minutes, with a fault every few minutes.

Starts ``asyncloco-coordinator serve`` and ``--clients`` ``asyncloco-client join`` processes of
different speeds (``--slowdown 1,2,4,8``) on the real Redis and RabbitMQ, and every
``--fault-every`` seconds after the warm-up injects the next fault of a seeded rotation, always on
processes and keys of this run only:

* ``coordinator_kill``: SIGKILL the coordinator, restart it with ``--resume`` on its checkpoint dir;
* ``client_kill``: SIGKILL one client (a seeded choice), restart it with the same id and state dir;
* ``redis_loss``: delete every Redis key of the run in one DEL (``coordinator.run_admin.delete_run_keys``;
  never FLUSHALL: runs share Redis);
* ``broker_restart``: ``rabbitmqctl stop_app``, 3 s, ``start_app``. This restarts the whole shared
  broker: ``--no-broker-faults`` leaves it out; where rabbitmqctl is missing it is skipped.

At the end the clients are stopped (SIGTERM: the round in hand is sent), the queue drains, the
coordinator stops, and the oracle of ``harness/oracle.py`` compares the clients' journals of
confirmed deltas with the coordinator's applied log: lost, applied twice, applied unconfirmed.
VmRSS of every process it started is sampled every ``--sample-every`` seconds into
``soak_rss.csv`` (a restarted process is followed under its new pid); the table gives each
process's RSS after ``--warmup`` and at the end (medians of 3 samples), the growth, and the trend
of its longest-lived pid, so a slow leak shows. The table goes to ``soak.csv`` too; logs, journals
and the checkpoint stay in ``--out``/RUN/. Every process it started is stopped by pid, and the
run's Redis keys and queues are deleted. Exit code 1 when the oracle finds anything.

    .venv/bin/python benchmarks/soak.py                      # 30 min, ~10 faults
    .venv/bin/python benchmarks/soak.py --minutes 4 --fault-every 45 --no-broker-faults
"""

from __future__ import annotations

import csv
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis

from coordinator.applied_log import FILENAME as APPLIED_LOG
from coordinator.run_admin import delete_run, delete_run_keys
from harness.faults import client_args, coordinator_args, run_key, status, verify_snapshot
from harness.oracle import judge, read_committed, read_journal, settled_ids
from harness.processes import AMQP_URL, REDIS_URL, Processes, ensure_services, new_run_name, reachable
from shared.cli import OneLineErrorsCommand
from shared.keys import RunKeys
from shared.settings import ConnectionSettings

SLOWDOWNS = (1, 2, 4, 8)
FAULT_KINDS = ("coordinator_kill", "client_kill", "redis_loss", "broker_restart")
BROKER_DOWN_S = 3.0  # as tests/faults/test_broker_restart.py
MAX_UNPLANNED_RESTARTS = 3  # per process: past that the product is broken and the soak stops
END_MARGIN_S = 30.0  # no fault this close to the end: its recovery should be seen
TREND_SETTLE_S = 60.0  # a new process's RSS climbs for ~30 s (torch, corpus, first round)
TREND_SPAN_S = 120.0


@dataclass
class Role:
    """The coordinator or one client: one name, a process that the soak restarts by hand."""

    name: str
    args: list[str]
    proc: subprocess.Popen
    pids: list[tuple[int, float]]  # (pid, soak time it started)
    journal: Path | None = None
    unplanned: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Fault:
    """One injected fault (or an exit nobody asked for), and when the run was seen to recover."""

    t_s: float
    kind: str
    target: str
    note: str = ""
    recovered_s: float | None = None
    probe: Callable[[], bool] | None = field(default=None, repr=False)


class Soak:
    """Starts the run, injects faults, samples RSS; ``finish`` stops it and asks the oracle."""

    def __init__(self, *, run: str, workdir: Path, clients: int, seed: int, minutes: float,
                 broker_faults: bool, rss_csv: Path) -> None:
        self.run = run
        self.workdir = workdir
        self.ckpt = workdir / "ckpt"
        self.state = workdir / "state"
        _, self.coordinator_key = run_key(workdir)  # coordinator_args signs with it (ckpt's parent)
        self.seed = seed
        self.duration_s = minutes * 60
        self.rng = random.Random(seed)
        self.procs = Processes(workdir)
        self.coordinator: Role | None = None
        self.clients: list[Role] = []
        self.n_clients = clients
        kinds = [k for k in FAULT_KINDS if broker_faults or k != "broker_restart"]
        self.rng.shuffle(kinds)  # a seeded rotation: every kind once before any comes back
        self.kinds = kinds
        self.faults: list[Fault] = []
        self.samples: list[tuple[float, str, int, float]] = []  # (t_s, role, pid, rss MiB)
        self.eval_start: tuple[float, float] | None = None  # (t_s, loss) at the first progress line
        self.t0 = time.monotonic()
        self._rss_file = rss_csv.open("w", newline="")
        self._rss = csv.writer(self._rss_file)
        self._rss.writerow(["t_s", "process", "pid", "rss_mib"])

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- processes --------------------------------------------------------------------------------

    def _backstop_s(self) -> float:
        """--max-seconds for a process started now: it stops by itself even if the soak is killed."""
        return max(60.0, self.duration_s - self.now()) + 300

    def start(self) -> None:
        args = coordinator_args(self.run, self.ckpt, "--seed", str(self.seed))
        proc = self._spawn("coordinator", args, resume=False)
        self._wait_serving(proc)
        self.t0 = time.monotonic()  # soak time starts with the clients
        self.coordinator = Role("coordinator", args, proc, [(proc.pid, 0.0)])
        for i in range(self.n_clients):
            slowdown = SLOWDOWNS[i % len(SLOWDOWNS)]
            cid = f"c{i + 1}-x{slowdown}"
            journal = self.workdir / f"{cid}.journal"
            args = [*client_args(self.run, cid, self.state, journal, 0, coordinator_key=self.coordinator_key),
                    "--slowdown", str(slowdown)]
            role = Role(cid, args, self._spawn(cid, args, resume=False), [], journal)
            role.pids.append((role.pid, 0.0))
            self.clients.append(role)

    def _spawn(self, name: str, args: list[str], *, resume: bool) -> subprocess.Popen:
        extra = ["--resume"] if resume else []
        # client_args puts --max-seconds first; a later repeat of the option wins in click
        return self.procs.start(name, *args, *extra, "--max-seconds", str(self._backstop_s()))

    def _wait_serving(self, proc: subprocess.Popen, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            coord = status(self.run).get("coordinator", {})
            if coord.get("pid") == proc.pid and coord.get("state") == "serving":
                return
            if proc.poll() is not None:
                raise click.ClickException(f"the coordinator exited ({proc.returncode}); see "
                                           f"{self.workdir / 'coordinator.log'}")
            time.sleep(0.5)
        raise click.ClickException(f"the coordinator did not serve within {timeout_s:.0f} s")

    def _restart(self, role: Role) -> None:
        coordinator = role is self.coordinator
        role.proc = self._spawn(role.name, role.args, resume=coordinator)
        role.pids.append((role.pid, self.now()))

    def roles(self) -> list[Role]:
        return [r for r in (self.coordinator, *self.clients) if r is not None]

    # -- observations -----------------------------------------------------------------------------

    def sample_rss(self) -> None:
        t = self.now()
        for role in self.roles():
            rss = _vm_rss_mib(role.pid)
            if rss is not None:
                self.samples.append((t, role.name, role.pid, rss))
                self._rss.writerow([f"{t:.1f}", role.name, role.pid, f"{rss:.1f}"])
        self._rss_file.flush()

    def confirmed(self) -> set[str]:
        return {i for role in self.clients if role.journal for i in read_journal(role.journal)}

    def _applied_log_bytes(self) -> int:
        path = self.ckpt / APPLIED_LOG
        return path.stat().st_size if path.exists() else 0

    def check_exits(self) -> None:
        """A process that ended without being asked is a finding: note it, restart it (bounded)."""
        for role in self.roles():
            rc = role.proc.poll()
            if rc is None:
                continue
            role.unplanned += 1
            if role.unplanned > MAX_UNPLANNED_RESTARTS:
                raise click.ClickException(f"{role.name} exited by itself {role.unplanned} times "
                                           f"(last exit code {rc}); see {self.workdir}")
            pid = role.pid
            self._restart(role)
            self._note(Fault(self.now(), "unplanned_exit", f"{role.name} pid {pid} -> {role.pid}",
                             f"exit code {rc}, not injected; restarted"))

    def check_recovery(self) -> None:
        t = self.now()
        for fault in self.faults:
            if fault.recovered_s is None and fault.probe is not None and fault.probe():
                fault.recovered_s = t - fault.t_s
                fault.probe = None

    def progress(self) -> str:
        s = status(self.run)
        rss = " ".join(f"{name}={rss:.0f}" for (_, name, _, rss) in self._last_samples())
        loss = s.get("eval", {}).get("latest")
        if self.eval_start is None and loss is not None:
            self.eval_start = (self.now(), loss)
        return (f"  t={self.now():5.0f}s  version {s.get('version', '-')}  applied "
                f"{s.get('deltas', {}).get('applied', '-')}  confirmed {len(self.confirmed())}  "
                f"eval {_f(loss, '.3f')}  RSS MiB: {rss}")

    def _last_samples(self) -> list[tuple[float, str, int, float]]:
        last: dict[str, tuple[float, str, int, float]] = {}
        for sample in self.samples:
            last[sample[1]] = sample
        return list(last.values())

    # -- faults -----------------------------------------------------------------------------------

    def inject(self, index: int) -> None:
        kind = self.kinds[index % len(self.kinds)]
        fault = getattr(self, f"_{kind}")()
        self._note(fault)

    def _note(self, fault: Fault) -> None:
        self.faults.append(fault)
        click.echo(f"  t={fault.t_s:5.0f}s  {fault.kind}: {fault.target}"
                   f"{f' ({fault.note})' if fault.note else ''}")

    def _after_commit_probe(self) -> Callable[[], bool]:
        """Recovered once a commit settles a delta past what the applied log held at the fault."""
        size = self._applied_log_bytes()
        return lambda: self._applied_log_bytes() > size

    def _coordinator_kill(self) -> Fault:
        assert self.coordinator is not None
        t, pid = self.now(), self.coordinator.pid
        probe = self._after_commit_probe()
        self.coordinator.proc.kill()
        self.coordinator.proc.wait()  # reaped: a zombie's pid would look alive to the lease check
        self._restart(self.coordinator)
        return Fault(t, "coordinator_kill", f"coordinator pid {pid} -> {self.coordinator.pid}",
                     "SIGKILL, restarted with --resume", probe=probe)

    def _client_kill(self) -> Fault:
        role = self.rng.choice(self.clients)
        assert role.journal is not None
        t, pid = self.now(), role.pid
        role.proc.kill()
        role.proc.wait()
        before = len(read_journal(role.journal))
        _drop_torn_line(role.journal)  # the restarted client appends: keep lines whole
        self._restart(role)
        journal = role.journal
        return Fault(t, "client_kill", f"{role.name} pid {pid} -> {role.pid}",
                     "SIGKILL, restarted with the same id and state dir",
                     probe=lambda: len(read_journal(journal)) > before)

    def _redis_loss(self) -> Fault:
        t = self.now()
        probe = self._after_commit_probe()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            deleted = delete_run_keys(client, RunKeys(self.run))
        finally:
            client.close()
        return Fault(t, "redis_loss", f"{deleted} keys of run {self.run}", "one DEL", probe=probe)

    def _broker_restart(self) -> Fault:
        t = self.now()
        if shutil.which("rabbitmqctl") is None:
            return Fault(t, "broker_restart", "skipped", "rabbitmqctl not found on PATH")
        probe = self._after_commit_probe()
        started = time.monotonic()
        try:
            _rabbitmqctl("stop_app")  # every connection drops; the durable quorum queue stays
            time.sleep(BROKER_DOWN_S)
        finally:
            _rabbitmqctl("start_app")
            deadline = time.monotonic() + 60
            while not reachable(5672):
                if time.monotonic() > deadline:
                    raise click.ClickException("RabbitMQ did not accept connections 60 s after start_app")
                time.sleep(0.5)
        return Fault(t, "broker_restart", "rabbitmqctl stop_app / start_app",
                     f"down {time.monotonic() - started:.1f} s", probe=probe)

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Stop clients, let the queue drain, stop the coordinator; return the oracle's findings."""
        assert self.coordinator is not None
        for role in self.clients:
            if role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)  # the round in hand is sent, then it exits
        client_rcs = {role.name: _wait(role.proc, 120) for role in self.clients}
        confirmed = self.confirmed()
        deadline = time.monotonic() + 180
        drained = False
        while time.monotonic() < deadline and self.coordinator.proc.poll() is None:
            if confirmed <= settled_ids(self.ckpt):
                drained = True
                break
            time.sleep(1)
        if self.coordinator.proc.poll() is None:
            self.coordinator.proc.send_signal(signal.SIGTERM)  # commits, then exits 0
        coordinator_rc = _wait(self.coordinator.proc, 60)
        verdict = judge(confirmed, read_committed(self.ckpt))
        final = status(self.run)
        try:
            snapshot: int | str = verify_snapshot(self.run)
        except Exception as exc:  # a failed check is a finding to print, not a crash of the soak
            snapshot = f"failed: {exc}"
        return {"verdict": verdict, "drained": drained, "client_rcs": client_rcs,
                "coordinator_rc": coordinator_rc, "status": final, "snapshot": snapshot}

    def close(self) -> None:
        self.procs.stop_all()  # only the processes this soak started, by their handles
        self._rss_file.close()


def _vm_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB → MiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _drop_torn_line(journal: Path) -> None:
    """Cut a last line the killed client did not finish; read_journal ignores it anyway."""
    if journal.exists():
        data = journal.read_bytes()
        if data and not data.endswith(b"\n"):
            journal.write_bytes(data[: data.rfind(b"\n") + 1])


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def _wait(proc: subprocess.Popen, timeout_s: float) -> int | str:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"killed after ignoring SIGTERM for {timeout_s:.0f} s"


def rss_summary(samples: list[tuple[float, str, int, float]], role: Role, *, warmup_s: float,
                end_s: float) -> dict[str, Any]:
    """RSS of one role at start (after the warm-up) and end, medians of 3 samples, and its trend.

    The trend is a least-squares slope (MiB/min) over the samples of the role's longest-lived pid,
    from one warm-up (at least TREND_SETTLE_S) after that pid started, over at least TREND_SPAN_S:
    a restart resets RSS, a leak is a steady slope; a shorter stretch gives no trend.
    """
    mine = [(t, pid, rss) for t, name, pid, rss in samples if name == role.name and t <= end_s]
    start = [rss for t, _, rss in mine if t >= warmup_s][:3]
    last_pid = role.pids[-1][0]
    end = [rss for _, pid, rss in mine if pid == last_pid][-3:]
    best: list[tuple[float, float]] = []
    for pid, started in role.pids:
        settled = [(t, rss) for t, p, rss in mine
                   if p == pid and t >= started + max(warmup_s, TREND_SETTLE_S)]
        if len(settled) > len(best):
            best = settled
    trend = None
    if len(best) >= 6 and best[-1][0] - best[0][0] >= TREND_SPAN_S:
        mean_t = statistics.fmean(t for t, _ in best)
        mean_r = statistics.fmean(r for _, r in best)
        var = sum((t - mean_t) ** 2 for t, _ in best)
        trend = 60 * sum((t - mean_t) * (r - mean_r) for t, r in best) / var if var else None
    s = statistics.median(start) if start else None
    e = statistics.median(end) if end else None
    restarts = [f"{t:.0f}s" for _, t in role.pids[1:]]
    return {"start": s, "end": e, "growth": None if s is None or e is None else e - s, "trend": trend,
            "pids": "->".join(str(p) for p, _ in role.pids),
            "note": f"restarted at {', '.join(restarts)} (end is the new pid's)" if restarts else ""}


def _f(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


@click.command(cls=OneLineErrorsCommand, context_settings={"help_option_names": ["-h", "--help"]},
               help=__doc__.split("\n\n")[0])
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Length of the soak, from the clients' start.")
@click.option("--clients", type=click.IntRange(1, 8), default=4, show_default=True,
              help="Clients, at --slowdown 1, 2, 4, 8 (repeating).")
@click.option("--fault-every", type=click.FloatRange(min=10), default=180.0, show_default=True,
              help="Seconds between faults (the first one this long after the warm-up).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the fault rotation, which client is killed, and the initial model.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/soak"),
              show_default=True, help="Results folder: soak.csv, soak_rss.csv, and RUN/ with the logs.")
@click.option("--warmup", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds before the start RSS is taken.")
@click.option("--sample-every", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds between RSS samples.")
@click.option("--no-broker-faults", is_flag=True,
              help="Leave out broker_restart (it restarts the shared RabbitMQ for everyone on it).")
def main(minutes: float, clients: int, fault_every: float, seed: int, out: Path, warmup: float,
         sample_every: float, no_broker_faults: bool) -> int:
    duration_s = minutes * 60
    if duration_s < warmup + 3 * sample_every + END_MARGIN_S:
        raise click.BadParameter(f"{minutes:g} min leaves no time after the {warmup:g} s warm-up; "
                                 f"give at least {(warmup + 3 * sample_every + END_MARGIN_S) / 60:.1f}",
                                 param_hint="--minutes")
    broker_faults = not no_broker_faults
    if broker_faults and shutil.which("rabbitmqctl") is None:
        click.echo("note: rabbitmqctl not found: broker_restart faults will be skipped")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below still runs
    ensure_services()
    run = new_run_name("soak")
    workdir = (out / run).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    schedule = [warmup + i * fault_every for i in range(1, int(duration_s // fault_every) + 2)
                if warmup + i * fault_every <= duration_s - END_MARGIN_S]
    soak = Soak(run=run, workdir=workdir, clients=clients, seed=seed, minutes=minutes,
                broker_faults=broker_faults, rss_csv=out / "soak_rss.csv")
    click.echo(f"soak: run {run}, {clients} clients (--slowdown "
               f"{','.join(str(SLOWDOWNS[i % 4]) for i in range(clients))}), {minutes:g} min, "
               f"{len(schedule)} faults every {fault_every:g} s after a {warmup:g} s warm-up, "
               f"rotation {' '.join(soak.kinds)}, seed {seed}; logs in {workdir}", nl=True)
    started = time.monotonic()
    try:
        soak.start()
        next_sample, next_progress, injected = 0.0, 60.0, 0
        while (t := soak.now()) < duration_s:
            if t >= next_sample:
                soak.sample_rss()
                next_sample += sample_every
            soak.check_exits()
            soak.check_recovery()
            if injected < len(schedule) and t >= schedule[injected]:
                soak.inject(injected)
                injected += 1
            if t >= next_progress:
                click.echo(soak.progress())
                next_progress += 60
            time.sleep(0.5)
        end_s = soak.now()
        soak.check_recovery()
        click.echo(f"soak: {end_s:.0f} s done; stopping the clients and draining the queue")
        result = soak.finish()
        return report(soak, result, out=out, warmup_s=warmup, end_s=end_s, fault_every=fault_every,
                      wall_s=time.monotonic() - started)
    except (KeyboardInterrupt, SystemExit):
        click.echo(f"soak: interrupted at {soak.now():.0f} s; stopping what it started", err=True)
        raise
    finally:
        soak.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            # the run's Redis keys and its queues; nobody else's
            delete_run(client, ConnectionSettings(amqp_url=AMQP_URL), run)
        except Exception as exc:  # the results stand; say what is left behind
            click.echo(f"soak: could not delete run {run}'s keys/queues: {exc}", err=True)
        finally:
            client.close()


def report(soak: Soak, result: dict[str, Any], *, out: Path, warmup_s: float, end_s: float,
           fault_every: float, wall_s: float) -> int:
    verdict = result["verdict"]
    final = result["status"]
    rows: list[dict[str, Any]] = [{"section": "run", "item": soak.run, "count": soak.n_clients,
                                   "note": f"minutes={soak.duration_s / 60:g} fault_every={fault_every:g} "
                                           f"seed={soak.seed} rotation={' '.join(soak.kinds)}"}]
    click.echo(f"\nasyncloco soak: run {soak.run}, {soak.n_clients} clients, {end_s / 60:.1f} min, "
               f"seed {soak.seed}, wall {wall_s / 60:.1f} min")
    click.echo(f"\n{'t (s)':>6}  {'fault':<16} {'target':<34} {'recovered (s)':>13}  note")
    for f in soak.faults:
        click.echo(f"{f.t_s:>6.0f}  {f.kind:<16} {f.target:<34} {_f(f.recovered_s):>13}  {f.note}")
        rows.append({"section": "fault", "item": f.kind, "t_s": round(f.t_s, 1),
                     "recovered_s": None if f.recovered_s is None else round(f.recovered_s, 1),
                     "note": f"{f.target}; {f.note}"})
    kills = sum(f.kind in ("client_kill", "unplanned_exit") and not f.target.startswith("coordinator")
                for f in soak.faults)
    rejected = sum(len(r) for r in verdict.rejected.values())
    reasons: dict[str, int] = {}
    for rs in verdict.rejected.values():
        for reason in rs:
            reasons[reason] = reasons.get(reason, 0) + 1
    counts = {"confirmed": len(verdict.confirmed), "applied": sum(verdict.applied.values()),
              "rejected": rejected, "lost": len(verdict.lost), "duplicated": len(verdict.duplicated),
              "unexpected": len(verdict.unexpected), "duplicates_recognised": verdict.duplicates_seen}
    click.echo("\ndeltas (oracle: client journals vs the coordinator's applied log)")
    click.echo("  ".join(f"{k:>{max(len(k), 5)}}" for k in counts))
    click.echo("  ".join(f"{v:>{max(len(k), 5)}}" for k, v in counts.items()))
    notes = {"rejected": ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
             "lost": " ".join(sorted(verdict.lost)[:20]),
             "duplicated": " ".join(sorted(verdict.duplicated)[:20]),
             "unexpected": f"allowed up to {kills} (one per client kill: confirmed, not yet journaled) "
                           f"{' '.join(sorted(verdict.unexpected)[:20])}".rstrip()}
    for k, v in counts.items():
        rows.append({"section": "deltas", "item": k, "count": v, "note": notes.get(k, "")})
    if reasons:
        click.echo(f"rejected by reason: {notes['rejected']}")
    click.echo(f"\n{'process':<12} {'pid(s)':<22} {'RSS start':>9} {'end':>7} {'growth':>7} "
               f"{'trend MiB/min':>13}  note")
    for role in soak.roles():
        s = rss_summary(soak.samples, role, warmup_s=warmup_s, end_s=end_s)
        click.echo(f"{role.name:<12} {s['pids']:<22} {_f(s['start']):>9} {_f(s['end']):>7} "
                   f"{_f(s['growth'], '+.1f'):>7} {_f(s['trend'], '+.2f'):>13}  {s['note']}")
        rows.append({"section": "rss", "item": role.name, "t_s": round(end_s, 1),
                     "rss_start_mib": _r(s["start"]), "rss_end_mib": _r(s["end"]),
                     "rss_growth_mib": _r(s["growth"]), "rss_trend_mib_per_min": _r(s["trend"], 3),
                     "note": f"pids {s['pids']}; {s['note']}".rstrip("; ")})
    t_eval, eval_start = soak.eval_start or (0.0, None)
    click.echo(f"\nfinal version {final.get('version')}, snapshot check: {result['snapshot']}; "
               f"eval loss {_f(eval_start, '.3f')} at {t_eval:.0f} s -> "
               f"{_f(final.get('eval', {}).get('latest'), '.3f')} at the end; "
               f"exit codes: coordinator {result['coordinator_rc']}, clients {result['client_rcs']}")
    problems = []
    if verdict.lost or verdict.duplicated:
        problems.append(f"lost {sorted(verdict.lost)} duplicated {sorted(verdict.duplicated)}")
    if len(verdict.unexpected) > kills:
        problems.append(f"{len(verdict.unexpected)} applied unconfirmed, more than {kills} client kills")
    if not result["drained"]:
        problems.append("the queue did not drain: confirmed deltas never reached a commit")
    if result["snapshot"] != final.get("version"):
        problems.append(f"snapshot check {result['snapshot']} != status version {final.get('version')}")
    tracebacks = {p.stem: n for p in sorted(soak.workdir.glob("*.log"))
                  if (n := p.read_text(errors="replace").count("Traceback"))}
    click.echo(f"tracebacks in the logs: {tracebacks or 'none'}")
    unplanned = [f for f in soak.faults if f.kind == "unplanned_exit"]
    if unplanned:
        problems.append(f"{len(unplanned)} process(es) exited by themselves")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "soak.csv"
    fields = ["section", "item", "t_s", "count", "recovered_s", "rss_start_mib", "rss_end_mib",
              "rss_growth_mib", "rss_trend_mib_per_min", "note"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    click.echo(f"wrote {path} and {out / 'soak_rss.csv'}")
    click.echo(f"oracle: {'; '.join(problems)}" if problems else
               "oracle: nothing lost, nothing applied twice, nothing applied unconfirmed")
    return 1 if problems else 0


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    sys.exit(main())
