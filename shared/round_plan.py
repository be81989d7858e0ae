"""The round plan the coordinator publishes (signed) and every client reads before a round: how it
sizes and paces its round (:class:`RoundMode`, Dynamic Local Updates' assignments), decoded as
strictly as every wire message (:mod:`shared.protocol`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import msgpack

from shared import PROTOCOL_VERSION
from shared.errors import ProtocolError
from shared.keys import MAX_DELTA_QUEUES
from shared.protocol import check_protocol, require_field, unpack_limited


class RoundMode(str, Enum):
    """How a client sizes and paces its next round: the one value the plan carries for it.

    ``dylu``       asynchronous, H_i from this client's measured speed (Dynamic Local Updates);
    ``fixed``      asynchronous, every client runs H (``--no-dylu``);
    ``sync``       synchronous DiLoCo: run H, then wait for the round's new version;
    ``warm_start`` ordinary single-worker training first: run H; a client other than the plan's
                   ``warm_client`` (when one is named) waits.
    """

    DYLU = "dylu"
    FIXED = "fixed"
    SYNC = "sync"
    WARM_START = "warm_start"


# A plan names at most this many clients' round lengths, by ids of at most this many chars: about
# 300 KB of msgpack at most (a client reads the plan every round), far more clients than one run has.
PLAN_MAX_ASSIGNMENTS = 4096
PLAN_MAX_ID_CHARS = 64
PLAN_MAX_BYTES = 512 * 1024
PLAN_MAX_GRACE_S = 60.0  # a client waits at most this long for a buffer cycle to close
PLAN_MAX_ARRIVAL_SHARE = 2.0  # ε(1 + β)/N with ε ≤ 1, β < 1, N ≥ 1 stays below it


@dataclass(frozen=True)
class RoundPlan:
    """What every client needs to size its round (Dynamic Local Updates).

    The fastest active client runs ``local_steps`` (H) per round; in ``RoundMode.DYLU`` a client
    measured at ``v_i`` steps/s runs ``max(min_local_steps, floor(v_i / fastest_steps_per_s * H))``,
    and ``assignments`` holds exactly that ``H_i`` per active client id, from the speeds the
    coordinator measured itself (a client it does not name runs H). ``fastest_steps_per_s`` is 0
    while no speed has been measured yet. ``grace_s``: how long a client whose delta is in a
    snapshot whose buffer cycle is still open (the manifest's ``progress["cycle_open"]``) may wait
    for the cycle's momentum step before its next round (0: start at once). ``arrival_share``:
    the share of a full round's delta that the outer step moves θ by when it arrives (edn:
    ε(1 + β)/N, dn: ε/N; 0: the strategy moves θ later or never at arrival, as sync and FedBuff
    do): a client that starts its next round before its delta is in a snapshot (``--overlap``)
    starts from the newest snapshot moved by that share of its delta, as the coordinator will
    move it, and says so (:attr:`~shared.protocol.DeltaMessage.stacked_on`).
    """

    run_id: str
    local_steps: int
    min_local_steps: int
    fastest_steps_per_s: float
    active_clients: int
    mode: RoundMode = RoundMode.DYLU
    updated_at: float = 0.0
    warm_client: str = ""  # RoundMode.WARM_START: the client that trains alone ("" = anyone may)
    assignments: dict[str, int] = field(default_factory=dict)  # client id -> H_i (RoundMode.DYLU)
    grace_s: float = 0.0
    arrival_share: float = 0.0
    delta_queues: int = 1  # the run's delta queues (RunKeys.delta_queue_for picks a client's)

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "protocol": PROTOCOL_VERSION,
                "type": "plan",
                "run_id": self.run_id,
                "local_steps": self.local_steps,
                "min_local_steps": self.min_local_steps,
                "fastest_steps_per_s": float(self.fastest_steps_per_s),
                "active_clients": self.active_clients,
                "mode": self.mode.value,
                "updated_at": float(self.updated_at),
                "warm_client": self.warm_client,
                "assignments": self.assignments,
                "grace_s": float(self.grace_s),
                "arrival_share": float(self.arrival_share),
                "delta_queues": self.delta_queues,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> RoundPlan:
        obj = check_protocol(unpack_limited(data, max_bytes=PLAN_MAX_BYTES, max_items=PLAN_MAX_ASSIGNMENTS,
                                            max_str=256))
        if obj.get("type") != "plan":
            raise ProtocolError("wrong_schema", "not a round plan")
        mode_name = require_field(obj, "mode", str)
        try:
            mode = RoundMode(mode_name)
        except ValueError:
            raise ProtocolError("wrong_schema", f"unknown round mode {mode_name[:32]!r}") from None
        plan = cls(
            run_id=require_field(obj, "run_id", str),
            local_steps=require_field(obj, "local_steps", int),
            min_local_steps=require_field(obj, "min_local_steps", int),
            fastest_steps_per_s=float(require_field(obj, "fastest_steps_per_s", (int, float))),
            active_clients=require_field(obj, "active_clients", int),
            mode=mode,
            updated_at=float(require_field(obj, "updated_at", (int, float))),
            warm_client=require_field(obj, "warm_client", str) if "warm_client" in obj else "",
            assignments=require_field(obj, "assignments", dict) if "assignments" in obj else {},
            grace_s=float(require_field(obj, "grace_s", (int, float))) if "grace_s" in obj else 0.0,
            arrival_share=(float(require_field(obj, "arrival_share", (int, float)))
                           if "arrival_share" in obj else 0.0),
            delta_queues=require_field(obj, "delta_queues", int) if "delta_queues" in obj else 1,
        )
        if not 1 <= plan.min_local_steps <= plan.local_steps:
            raise ProtocolError("wrong_schema", "plan needs 1 <= min_local_steps <= local_steps")
        if not 0 <= plan.grace_s <= PLAN_MAX_GRACE_S:
            raise ProtocolError("wrong_schema", f"plan grace_s must be within 0..{PLAN_MAX_GRACE_S}")
        if not 0 <= plan.arrival_share <= PLAN_MAX_ARRIVAL_SHARE:
            raise ProtocolError("wrong_schema",
                                f"plan arrival_share must be within 0..{PLAN_MAX_ARRIVAL_SHARE}")
        if not 1 <= plan.delta_queues <= MAX_DELTA_QUEUES:
            raise ProtocolError("wrong_schema", f"plan delta_queues must be within 1..{MAX_DELTA_QUEUES}")
        for client_id, steps in plan.assignments.items():
            if not isinstance(client_id, str) or not 1 <= len(client_id) <= PLAN_MAX_ID_CHARS:
                raise ProtocolError("wrong_schema",
                                    f"assignment key must be a client id of 1-{PLAN_MAX_ID_CHARS} chars")
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise ProtocolError("wrong_schema", f"assignment of {client_id!r} is not an int")
            if not plan.min_local_steps <= steps <= plan.local_steps:
                raise ProtocolError("wrong_schema", f"assignment {steps} of {client_id!r} outside "
                                    f"{plan.min_local_steps}..{plan.local_steps}")
        return plan
