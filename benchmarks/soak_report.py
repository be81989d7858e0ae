"""The soak's report: faults and their recoveries, the oracle's counts, each process's RSS and its
trend; printed as tables and written to ``soak.csv`` (``soak.py`` runs the soak)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import click


class Role(Protocol):
    """One process of the soak as the report reads it (``soak.Role``)."""

    name: str
    pids: list[tuple[int, float]]  # (pid, soak time it started)


class Soak(Protocol):
    """The soak as the report reads it (``soak.Soak``): what it was, what happened, what it saw."""

    run: str
    n_clients: int
    duration_s: float
    seed: int
    kinds: Sequence[str]
    faults: Sequence[Any]  # soak.Fault: t_s, kind, target, recovered_s, note
    samples: list[tuple[float, str, int, float]]  # (t, process, pid, RSS MiB)
    eval_start: tuple[float, float] | None  # (t_s, loss) at the first progress line
    workdir: Path

    def roles(self) -> Sequence[Role]: ...

TREND_SETTLE_S = 60.0  # a new process's RSS climbs for ~30 s (torch, corpus, first round)
TREND_SPAN_S = 120.0


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
        click.echo(f"{f.t_s:>6.0f}  {f.kind:<16} {f.target:<34} {fmt(f.recovered_s):>13}  {f.note}")
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
        click.echo(f"{role.name:<12} {s['pids']:<22} {fmt(s['start']):>9} {fmt(s['end']):>7} "
                   f"{fmt(s['growth'], '+.1f'):>7} {fmt(s['trend'], '+.2f'):>13}  {s['note']}")
        rows.append({"section": "rss", "item": role.name, "t_s": round(end_s, 1),
                     "rss_start_mib": _r(s["start"]), "rss_end_mib": _r(s["end"]),
                     "rss_growth_mib": _r(s["growth"]), "rss_trend_mib_per_min": _r(s["trend"], 3),
                     "note": f"pids {s['pids']}; {s['note']}".rstrip("; ")})
    t_eval, eval_start = soak.eval_start or (0.0, None)
    click.echo(f"\nfinal version {final.get('version')}, snapshot check: {result['snapshot']}; "
               f"eval loss {fmt(eval_start, '.3f')} at {t_eval:.0f} s -> "
               f"{fmt(final.get('eval', {}).get('latest'), '.3f')} at the end; "
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


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
