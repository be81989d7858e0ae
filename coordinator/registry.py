"""Who is training: per-client speed, progress and de-duplication state, and the round plan.

A client counts as active while its last delta is younger than ``active_window_s``. Nothing a
client says about itself steers the plan: the coordinator measures each client's speed with its
own clock, as the local steps it credited over the wall time of the round,

    round = arrival − max(publish time of the delta's base version, arrival of its previous delta)

(a round cannot have started before its base existed, nor before the client's previous delta was
in), and assigns each active client its round length ``H_i`` by the Dynamic Local Updates rule
(:func:`shared.dylu.dylu_steps`) in the plan's ``assignments``. A client's self-reported
``compute_s`` is kept for ``status`` only. A delta is credited at most the steps some plan offered
its sender since its base was published (:meth:`ClientRegistry.assignment_limit`). Its reported
``device`` ("cuda: NVIDIA H200") is likewise kept for ``status`` and the dashboard only, and so are
the timings it reports of its previous round (``fetch_s``, ``encode_s``, ``upload_s``, ``wait_s``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.dylu import dylu_steps
from shared.errors import ConfigError
from shared.round_plan import PLAN_MAX_ASSIGNMENTS, PLAN_MAX_GRACE_S, RoundMode, RoundPlan

CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what a client id may be (client/identity.py)
SEQ_WINDOW = 4096  # remembered sequence numbers per client (far more than can be in flight)
PUBLISH_TIMES_KEPT = 1024  # versions whose publish time is kept: far beyond any sane staleness bound
OFFER_HISTORY = 16  # changes of a client's offered round length kept (it changes when speeds do)
# A plan a client reads may be older than its base's snapshot by about one plan refresh (1 s):
# an assignment counts as offered from this long before the base was published.
PLAN_LAG_S = 5.0
# A "round" shorter than this is the clocks' and the broker's noise, not training: not a measurement
# (and no sender can make itself look arbitrarily fast by sending right after a publish).
MIN_ROUND_S = 0.05
SPEED_EMA = 0.5  # weight of the newest round in a client's measured speed


@dataclass
class ClientRecord:
    client_id: str
    steps_per_s: float = 0.0  # EMA of credited local steps / measured round wall time (0: not yet)
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
    last_arrival: float = 0.0  # unix time its newest applied delta arrived (0: none yet)
    last_base: int = -1  # base version of its newest applied delta (one delta per base: OnePerBase)
    last_applied_seq: int = -1  # seq of that delta (a delta stacked on it may share its base)
    reported_compute_s: float = 0.0  # what it said its last round's compute took: shown, never used
    reported_device: str = ""  # what it said its last applied delta was trained on: shown, never used
    # what its last applied delta said of the round before (fetch_s, encode_s, upload_s, wait_s;
    # empty: it said nothing): shown, never used
    reported_timings: dict[str, float] = field(default_factory=dict)
    # (since unix time, local steps): the round lengths plans offered it, newest last, on change only
    offers: list[tuple[float, int]] = field(default_factory=list)

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
    min_local_steps: int = 5
    dylu: bool = True
    active_window_s: float = 60.0
    warm_start_steps: int = 0  # ordinary single-worker training for this many local steps first
    # the warm start's holder, the operator's choice ("": whoever sends first, see warm_start.py)
    warm_start_client: str = ""
    # An asynchronous client whose delta did not close the outer buffer's cycle waits up to this
    # many rounds of the fastest client for the cycle's momentum step before it trains on (the
    # plan's grace_s); 0 = start the next round at once. See docs/BENCHMARKS.md (parity).
    grace_rounds: float = 0.25

    def __post_init__(self) -> None:
        if not 1 <= self.min_local_steps or not 1 <= self.local_steps:
            raise ConfigError("local steps and min local steps must be >= 1")
        if not 0 <= self.grace_rounds <= 4:
            raise ConfigError("grace rounds must be within [0, 4]")
        if self.warm_start_client and not self.warm_start_steps:
            raise ConfigError("--warm-start-client names the holder of a warm start: it needs "
                              "--warm-start-steps")
        if self.warm_start_client and not CLIENT_ID.match(self.warm_start_client):
            raise ConfigError(f"--warm-start-client {self.warm_start_client[:80]!r} is not a client id "
                              "(1-64 of A-Z a-z 0-9 _ . -)")


class ClientRegistry:
    def __init__(self, plan: PlanConfig) -> None:
        self.plan_config = plan
        self.clients: dict[str, ClientRecord] = {}
        self.published_at: dict[int, float] = {}  # version -> unix time it was first published

    def get(self, client_id: str) -> ClientRecord:
        record = self.clients.get(client_id)
        if record is None:
            record = self.clients[client_id] = ClientRecord(client_id)
        return record

    # ---------------------------------------------------------------- what the coordinator measures
    def note_published(self, version: int, at: float) -> None:
        """Remember when ``version`` was first published (a republish keeps the first time)."""
        if version < 0 or version in self.published_at:
            return
        self.published_at[version] = at
        if len(self.published_at) > PUBLISH_TIMES_KEPT:
            for old in sorted(self.published_at)[:-PUBLISH_TIMES_KEPT]:
                del self.published_at[old]

    def assignment_limit(self, client_id: str, base_version: int) -> int:
        """The most local steps any plan may have told ``client_id`` to run on ``base_version``.

        That is every round length offered to it from (about) the publish of its base on: the one
        in effect then and every later one. H where that is not known (a client new to the plans,
        a base too old to have a publish time, a history that does not reach back so far), since a
        client the plan does not name runs H.
        """
        local_steps = self.plan_config.local_steps
        record = self.clients.get(client_id)
        published = self.published_at.get(base_version)
        if record is None or published is None:
            return local_steps
        since = published - PLAN_LAG_S
        earlier = [steps for at, steps in record.offers if at <= since]
        offered = [steps for at, steps in record.offers if at > since]
        offered.append(earlier[-1] if earlier else local_steps)
        return max(offered)

    def credit(self, client_id: str, base_version: int, *, local_steps: int, tokens: int,
               samples: int) -> tuple[int, int, int]:
        """(local steps, tokens, samples) a delta is credited: no more steps than it was assigned,
        and tokens and samples cut in the same proportion."""
        steps = min(local_steps, self.assignment_limit(client_id, base_version))
        if steps >= local_steps:
            return local_steps, tokens, samples
        return steps, tokens * steps // local_steps, samples * steps // local_steps

    def record_applied(
        self, *, client_id: str, seq: int, base_version: int, local_steps: int, compute_s: float,
        tokens: int, train_loss: float, staleness: int, now: float, device: str = "",
        timings: Mapping[str, float] | None = None, origin_version: int = -1,
    ) -> None:
        """Record an applied delta, credited ``local_steps`` and ``tokens``; measure the round.

        ``compute_s``, ``device`` and ``timings`` (of the client's previous round) are the client's
        own claims: kept for ``status``, never used.
        The speed is ``local_steps`` over the round's wall time on this machine's clock (see the
        module docstring); a client's first delta measures nothing (its round included joining, and
        its base may be older than its arrival in the run). A round that moved onto newer snapshots
        while it trained (``origin_version``, the client's claim) is dated from the one it began
        from, and only if that is earlier than ``base_version``: dating it from the version it
        ended on would make it look short, and the client fast (DyLU would then cut every other
        client's rounds); the claim can make a round look longer, never shorter.
        """
        record = self.get(client_id)
        if record.last_arrival > 0 and local_steps > 0:
            began = base_version if origin_version < 0 else min(origin_version, base_version)
            started = max(self.published_at.get(began, 0.0), record.last_arrival)
            if now - started >= MIN_ROUND_S:
                speed = local_steps / (now - started)
                record.steps_per_s = (speed if record.steps_per_s <= 0
                                      else SPEED_EMA * speed + (1 - SPEED_EMA) * record.steps_per_s)
        record.last_arrival = now
        if base_version >= record.last_base:
            record.last_base, record.last_applied_seq = base_version, seq
        record.reported_compute_s = compute_s
        record.reported_device = device
        record.reported_timings = dict(timings or {})
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

    def assignments(self, now: float) -> dict[str, int]:
        """Each active, measured client's round length ``H_i`` by the DyLU rule, from the speeds
        measured here. A client not measured yet is not named (it runs H, cut by the time budget);
        past :data:`PLAN_MAX_ASSIGNMENTS` active clients, the most recently seen are named."""
        measured = [c for c in self.active(now) if c.steps_per_s > 0]
        if len(measured) > PLAN_MAX_ASSIGNMENTS:
            measured = sorted(measured, key=lambda c: c.last_seen)[-PLAN_MAX_ASSIGNMENTS:]
        fastest = max((c.steps_per_s for c in measured), default=0.0)
        cfg = self.plan_config
        return {c.client_id: dylu_steps(c.steps_per_s, fastest, cfg.local_steps, cfg.min_local_steps)
                for c in measured}

    def plan(self, run_id: str, now: float, mode: RoundMode, warm_client: str = "") -> RoundPlan:
        """The round plan for ``mode`` (see :func:`coordinator.run_mode.round_mode`).

        Every plan built is taken as offered to every known client (it may be published, and a
        client may train by it): each one's round length in it is noted for
        :meth:`assignment_limit`. In ``RoundMode.DYLU`` that is its assignment, else H.
        """
        active = self.active(now)
        fastest = max((c.steps_per_s for c in active), default=0.0)
        assignments = self.assignments(now) if mode is RoundMode.DYLU else {}
        grace_s = 0.0
        if mode in (RoundMode.DYLU, RoundMode.FIXED) and fastest > 0:
            round_s = self.plan_config.local_steps / fastest  # the fastest client's round
            grace_s = min(PLAN_MAX_GRACE_S, self.plan_config.grace_rounds * round_s)
        for record in self.clients.values():
            offered = assignments.get(record.client_id, self.plan_config.local_steps)
            if not record.offers or record.offers[-1][1] != offered:
                record.offers.append((now, offered))
                del record.offers[:-OFFER_HISTORY]
        return RoundPlan(
            run_id=run_id,
            local_steps=self.plan_config.local_steps,
            min_local_steps=min(self.plan_config.min_local_steps, self.plan_config.local_steps),
            fastest_steps_per_s=fastest,
            active_clients=len(active),
            mode=mode,
            updated_at=now,
            warm_client=warm_client,
            assignments=assignments,
            grace_s=grace_s,
        )

    def save_state(self) -> dict[str, Any]:
        return {"clients": {cid: asdict(rec) for cid, rec in self.clients.items()},
                "published_at": {str(v): t for v, t in self.published_at.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.clients = {}
        for cid, rec in (state.get("clients") or {}).items():
            record = ClientRecord(**rec)
            record.offers = [(float(at), int(steps)) for at, steps in record.offers]  # JSON: lists
            self.clients[cid] = record
        self.published_at = {int(v): float(t) for v, t in (state.get("published_at") or {}).items()}
