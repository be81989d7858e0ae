"""Every Redis key and AMQP name asyncloco uses comes from here.

Layout for run ``R`` (all under the prefix ``asyncloco:R:``)::

    snapshot:{v}:manifest     msgpack manifest of version v (immutable)
    snapshot:{v}:chunk:{i}    i-th chunk of version v's flat parameter bytes (immutable)
    current                   the newest complete version, as a decimal string (the atomic flip)
    plan                      msgpack round plan (Dynamic Local Updates)
    status                    JSON status document written by the coordinator
    verdict:{client_id}       JSON verdict on the client's newest judged delta (shared/verdict.py)
    coordinator               lease of the running coordinator (its instance id, with a TTL)

AMQP: clients publish to the direct exchange ``asyncloco.R.deltas.in`` (a volunteer's broker user
may write to it and to nothing else), bound to the durable queue ``asyncloco.R.deltas``; rejected
deltas go to the dead-letter queue ``asyncloco.R.deltas.dead`` through the exchange
``asyncloco.R.dlx``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ConfigError

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_run_name(run: str) -> str:
    """Return ``run`` if it is a usable run name, else raise :class:`ConfigError`."""
    if not _RUN_NAME.fullmatch(run):  # match() would let "$" accept a trailing newline
        raise ConfigError(
            f"invalid run name {run!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return run


@dataclass(frozen=True)
class RunKeys:
    """Redis keys and AMQP names for one run."""

    run: str

    def __post_init__(self) -> None:
        validate_run_name(self.run)

    @property
    def prefix(self) -> str:
        return f"asyncloco:{self.run}:"

    def manifest(self, version: int) -> str:
        return f"{self.prefix}snapshot:{version}:manifest"

    def chunk(self, version: int, index: int) -> str:
        return f"{self.prefix}snapshot:{version}:chunk:{index}"

    @property
    def current(self) -> str:
        return f"{self.prefix}current"

    @property
    def plan(self) -> str:
        return f"{self.prefix}plan"

    @property
    def status(self) -> str:
        return f"{self.prefix}status"

    def verdict(self, client_id: str) -> str:
        return f"{self.prefix}verdict:{client_id}"

    @property
    def coordinator_lease(self) -> str:
        return f"{self.prefix}coordinator"

    # AMQP names
    @property
    def delta_exchange(self) -> str:
        return f"asyncloco.{self.run}.deltas.in"

    @property
    def delta_queue(self) -> str:
        return f"asyncloco.{self.run}.deltas"

    @property
    def dead_letter_exchange(self) -> str:
        return f"asyncloco.{self.run}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"asyncloco.{self.run}.deltas.dead"
