"""Who is training: per-client speed, progress and de-duplication state, and the round plan.

A client counts as active while its last delta is younger than ``active_window_s``. The fastest
active client's speed (local steps per second of compute) sets the Dynamic Local Updates plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shared.protocol import RoundMode, RoundPlan

SEQ_WINDOW = 4096  # remembered sequence numbers per client (far more than can be in flight)


@dataclass
class ClientRecord:
    client_id: str
    steps_per_s: float = 0.0  # EMA of local_steps / compute_s
    local_steps: int = 0
    tokens: int = 0
    updates: int = 0
    rejected: int = 0
    last_seen: float = 0.0  # unix time of its last applied delta
    last_contact: float = 0.0  # unix time of its last delta of this run, applied or not (sync rounds)
    last_loss: float = float("nan")
    last_staleness: int = 0
    last_round_steps: int = 0
    max_seq: int = -1
    recent_seqs: list[int] = field(default_factory=list)  # applied seqs, newest last

    def seen(self, seq: int) -> bool:
        return seq in self.recent_seqs

    def too_old(self, seq: int) -> bool:
        """True if ``seq`` is below everything remembered, so its fate is unknown: refuse it."""
        return len(self.recent_seqs) >= SEQ_WINDOW and seq < self.recent_seqs[0]

    def remember(self, seq: int) -> None:
        self.recent_seqs.append(seq)
        self.recent_seqs.sort()
        del self.recent_seqs[:-SEQ_WINDOW]
        self.max_seq = max(self.max_seq, seq)


@dataclass(frozen=True)
class PlanConfig:
    """Dynamic Local Updates: the fastest client runs ``local_steps``; nobody runs fewer than
    ``min_local_steps``. If slow clients' deltas are often rejected as stale, raise the staleness
    bound or lower ``local_steps``."""

    local_steps: int = 30
    min_local_steps: int = 3
    dylu: bool = True
    active_window_s: float = 60.0
    warm_start_steps: int = 0  # ordinary single-worker training for this many local steps first


class ClientRegistry:
    def __init__(self, plan: PlanConfig) -> None:
        self.plan_config = plan
        self.clients: dict[str, ClientRecord] = {}

    def get(self, client_id: str) -> ClientRecord:
        record = self.clients.get(client_id)
        if record is None:
            record = self.clients[client_id] = ClientRecord(client_id)
        return record

    def record_applied(
        self, *, client_id: str, seq: int, local_steps: int, compute_s: float, tokens: int,
        train_loss: float, staleness: int, now: float,
    ) -> None:
        record = self.get(client_id)
        if local_steps > 0 and compute_s > 0:
            speed = local_steps / compute_s
            record.steps_per_s = speed if record.updates == 0 else 0.5 * speed + 0.5 * record.steps_per_s
        record.local_steps += local_steps
        record.tokens += tokens
        record.updates += 1
        record.last_seen = now
        record.last_loss = train_loss
        record.last_staleness = staleness
        record.last_round_steps = local_steps
        record.remember(seq)

    def in_contact(self, now: float) -> set[str]:
        """Clients that sent any delta of this run within the window: a sync round waits for them."""
        window = self.plan_config.active_window_s
        return {c.client_id for c in self.clients.values()
                if now - max(c.last_contact, c.last_seen) <= window}

    def active(self, now: float) -> list[ClientRecord]:
        window = self.plan_config.active_window_s
        return [c for c in self.clients.values() if c.updates and now - c.last_seen <= window]

    def plan(self, run_id: str, now: float, mode: RoundMode, warm_client: str = "") -> RoundPlan:
        """The round plan for ``mode`` (see :func:`coordinator.run_mode.round_mode`)."""
        active = self.active(now)
        fastest = max((c.steps_per_s for c in active), default=0.0)
        return RoundPlan(
            run_id=run_id,
            local_steps=self.plan_config.local_steps,
            min_local_steps=min(self.plan_config.min_local_steps, self.plan_config.local_steps),
            fastest_steps_per_s=fastest,
            active_clients=len(active),
            mode=mode,
            updated_at=now,
            warm_client=warm_client,
        )

    def save_state(self) -> dict[str, Any]:
        return {"clients": {cid: asdict(rec) for cid, rec in self.clients.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.clients = {cid: ClientRecord(**rec) for cid, rec in (state.get("clients") or {}).items()}
