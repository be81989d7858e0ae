"""The run's status document: built by the coordinator, stored in Redis, read by ``status``.

``asyncloco-coordinator status --json`` prints this document; its shape is stable (``schema`` 1),
documented in docs/STATUS.md, and only ever grows new keys. Floats that are not numbers (no eval
yet) are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any

import redis

from coordinator.consumer import DeltaConsumer
from coordinator.parts import PartSpool
from coordinator.run_state import RunState
from shared.keys import RunKeys
from shared.protocol import ROUND_TIMINGS
from shared.round_plan import RoundMode

SCHEMA = 1
STATUS_TTL_S = 7 * 24 * 3600


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def build_status(run: RunState, *, consumer: DeltaConsumer | None, spool: PartSpool, started_at: float,
                 stopped: bool = False) -> dict[str, Any]:
    """The status document of ``run``, with the service's connection and spool figures."""
    now = time.time()
    registry = run.registry
    active_ids = {c.client_id for c in registry.active(now)}
    plan = run.plan(now)
    outer = run.config.outer
    intake = run.intake
    return {
        "schema": SCHEMA,
        "run": run.config.run,
        "run_id": run.run_id,
        "updated_at": now,
        "coordinator": {
            "state": "stopped" if stopped else "serving",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started_at,
            "amqp_connected": bool(consumer and consumer.connected.is_set()),
            "amqp_reconnects": consumer.reconnects if consumer else 0,
        },
        "version": run.version,
        "commits": run.commits,
        "deltas": {
            "applied": intake.counts["applied"],
            "duplicate": intake.counts["duplicate"],
            "rejected": intake.counts["rejected"],
            "rejected_by_reason": dict(sorted(intake.rejected_by_reason.items())),
            # the guard's decisions (judged, accepted, clipped, and each refusal reason)
            "guard": {"mode": run.guard.mode.value, **dict(sorted(run.guard.counts.items())),
                      # how well recent accepted deltas agree with the server's momentum
                      "median_cosine": _num(run.guard.direction.median_cosine())},
        },
        "progress": run.progress_doc(now),
        "eval": {
            "latest": _num(run.latest_eval) if run.eval_history else None,
            "history": [
                {"version": int(v), "time": t, "loss": _num(loss)}
                for v, t, loss in run.eval_history[-100:]
            ],
        },
        "clients": [
            {
                "client_id": c.client_id,
                "active": c.client_id in active_ids,
                "steps_per_s": _num(c.steps_per_s),
                "local_steps": c.local_steps,
                "last_round_steps": c.last_round_steps,
                "updates": c.updates,
                "rejected": c.rejected,
                "tokens": c.tokens,
                "last_seen": c.last_seen,
                "last_staleness": c.last_staleness,
                "last_loss": _num(c.last_loss),
                # the round length the plan assigns it now (null: none, it runs H)
                "assigned_steps": plan.assignments.get(c.client_id),
                "reported_compute_s": _num(c.reported_compute_s),  # its own claim: shown, never used
                "reported_device": c.reported_device,  # likewise ("": it has not said)
                # and its previous round's fetch_s, encode_s, upload_s, wait_s, likewise ({}: none said)
                "reported_timings": {name: _num(value) for name, value in c.reported_timings.items()},
            }
            for c in sorted(registry.clients.values(), key=lambda c: c.client_id)
        ],
        "plan": {
            "local_steps": plan.local_steps,
            "min_local_steps": plan.min_local_steps,
            "fastest_steps_per_s": _num(plan.fastest_steps_per_s),
            "active_clients": plan.active_clients,
            "mode": plan.mode.value,
            # The mode as the flags of schema 1, kept for readers of those (docs/STATUS.md).
            "dylu": plan.mode is RoundMode.DYLU,
            "sync": plan.mode is RoundMode.SYNC,
            "warm_start": plan.mode is RoundMode.WARM_START,
            "warm_client": plan.warm_client,
            "assigned_clients": len(plan.assignments),
        },
        "outer": {"strategy": outer.strategy, "lr": outer.lr, "momentum": outer.momentum,
                  "buffer_size": outer.buffer_size, "min_buffer": outer.min_buffer, "c": outer.c,
                  "staleness_exponent": outer.staleness_exponent},
        "queue": {
            "name": RunKeys(run.config.run).delta_queue,
            "count": run.config.queue.count,
            "delivered": dict(consumer.delivered) if consumer else {},  # since start, by queue
            "depth": consumer.queue_depth if consumer else None,
            "dead_letters": consumer.dead_letters if consumer else None,
        },
        "parts": {
            "spooled": spool.counts["parts_spooled"],
            "duplicate": spool.counts["parts_duplicate"],
            "assembled": spool.counts["assembled"],
            "incomplete": spool.counts["incomplete"],
            "pending_deltas": len(spool.entries),
            "reserved_bytes": spool.reserved_bytes,
        },
    }


def publish_status(client: redis.Redis, keys: RunKeys, doc: dict[str, Any]) -> None:
    client.set(keys.status, json.dumps(doc, allow_nan=False), ex=STATUS_TTL_S)


def read_status(client: redis.Redis, keys: RunKeys) -> dict[str, Any] | None:
    raw = client.get(keys.status)
    return None if raw is None else json.loads(raw)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


# The text view's column of a client's reported round timings (its claim, as the device is).
ROUND_SECONDS = "fetch/enc/up/wait s"


def _round_seconds(timings: dict[str, Any] | None) -> str:
    """``0.12/0.30/0.21/1.05`` (seconds: fetch, encode, upload, wait) or ``-`` when none was said
    (or by an older coordinator, whose document lacks them)."""
    if not timings or any(not isinstance(timings.get(n), (int, float)) for n in ROUND_TIMINGS):
        return "-"
    return "/".join(f"{t:.2f}" if t < 10 else f"{t:.1f}" if t < 1000 else f"{t:.0f}"
                    for t in (float(timings[n]) for n in ROUND_TIMINGS))


def render_text(doc: dict[str, Any], *, now: float | None = None) -> str:
    """Human-readable status: a header, eval history, clients table, rejection counts."""
    now = time.time() if now is None else now
    parts = doc.get("parts", {})
    coord = doc["coordinator"]
    age = now - doc["updated_at"]
    state = coord["state"] if age < 15 else f"not responding (last status {_ago(age)})"
    if coord["state"] == "stopped":
        state = f"stopped ({_ago(age)})"
    d = doc["deltas"]
    lines = [
        f"run {doc['run']} ({doc['run_id']})  coordinator: {state}  pid {coord['pid']}@{coord['host']}",
        f"version {doc['version']}  applied {d['applied']}  duplicate {d['duplicate']}  "
        f"rejected {d['rejected']}  queue depth {doc['queue']['depth']}  "
        f"dead letters {doc['queue']['dead_letters']}",
        *([f"parts: {parts['assembled']} deltas assembled, {parts['pending_deltas']} waiting, "
           f"{parts['incomplete']} discarded incomplete"] if parts.get("spooled") else []),
        f"progress: {doc['progress']['local_steps']} local steps, {doc['progress']['tokens']} tokens",
    ]
    history = doc["eval"]["history"]
    if history:
        shown = history if len(history) <= 8 else history[:1] + history[-7:]
        lines.append("eval loss: " + "  ".join(
            f"v{h['version']}={h['loss']:.3f}" for h in shown if h["loss"] is not None))
    plan = doc["plan"]
    lines.append(
        f"plan: H={plan['local_steps']} H_min={plan['min_local_steps']} "
        f"fastest={plan['fastest_steps_per_s'] or 0:.2f} steps/s  dylu={'on' if plan['dylu'] else 'off'}"
    )
    if doc["clients"]:
        lines.append(f"{'client':<24} {'active':<6} {'steps/s':>8} {'H next':>6} {'H last':>6} {'steps':>8} "
                     f"{'updates':>7} {'rejected':>8}  {'last seen':<9}  {ROUND_SECONDS:<23}  "
                     "device (reported)")
        for c in doc["clients"]:
            assigned = c.get("assigned_steps")  # a document of an older coordinator has none
            lines.append(
                f"{c['client_id']:<24} {'yes' if c['active'] else 'no':<6} "
                f"{c['steps_per_s'] or 0:>8.2f} {'-' if assigned is None else assigned:>6} "
                f"{c['last_round_steps']:>6} {c['local_steps']:>8} "
                f"{c['updates']:>7} {c['rejected']:>8}  {_ago(now - c['last_seen']):<9}  "
                f"{_round_seconds(c.get('reported_timings')):<23}  "
                f"{c.get('reported_device') or '-'}"  # none from an older coordinator or client
            )
    else:
        lines.append("no clients yet")
    if d["rejected_by_reason"]:
        lines.append("rejected: " + ", ".join(f"{k}={v}" for k, v in d["rejected_by_reason"].items()))
    guard = d.get("guard") or {}
    if guard.get("judged"):
        lines.append(f"guard ({guard['mode']}): judged={guard['judged']} clipped={guard.get('clipped', 0)} "
                     f"damped={guard.get('damped', 0)} distrusted={guard.get('direction_distrusted', 0)}"
                     + (f" tried={guard['distrust_tried']} cleared={guard.get('distrust_cleared', 0)}"
                        if guard.get("distrust_tried") else ""))
    return "\n".join(lines)
