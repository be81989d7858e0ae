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
and the checkpoint stay in ``--out``/RUN/ (the report: ``soak_report.py``). Every process it
started is stopped by pid, and the run's Redis keys and queues are deleted. Exit code 1 when the
oracle finds anything.

    .venv/bin/python benchmarks/soak.py                      # 30 min, ~10 faults
    .venv/bin/python benchmarks/soak.py --minutes 4 --fault-every 45 --no-broker-faults
"""

from __future__ import annotations

import csv
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
from served import memory_bytes
from soak_report import fmt, report

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
            rss_bytes = memory_bytes(role.pid)
            if rss_bytes is not None:
                rss = rss_bytes / 2**20  # MiB
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
                f"eval {fmt(loss, '.3f')}  RSS MiB: {rss}")

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

if __name__ == "__main__":
    sys.exit(main())
