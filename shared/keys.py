"""Every Redis key and AMQP name asyncloco uses comes from here.

Layout for run ``R`` (all under the prefix ``asyncloco:R:``)::

    snapshot:{R:vV}:manifest  signed manifest of version V (immutable)
    snapshot:{R:vV}:chunk:I   I-th chunk of version V's flat parameter bytes (immutable)
    current                   the newest complete version, as a decimal string (the atomic flip)
    plan                      msgpack round plan (Dynamic Local Updates)
    status                    JSON status document written by the coordinator
    verdicts:{client_id}      stream of the verdicts on the client's judged deltas (shared/verdict.py)
    coordinator               lease of the running coordinator (its instance id, with a TTL)

``{R:vV}`` is a Redis Cluster hash tag (the braces are literal): Redis Cluster hashes only what is
between the first ``{`` and the next ``}``, so every key of one version lands in one slot, and the
reader's ``MGET`` of chunks and the publisher's ``DEL`` of an old version never fail with CROSSSLOT.
A run name holds no braces or colons, so the tag names exactly one run and version. The keys still
start with ``asyncloco:R:snapshot:``, so the volunteers' ACL pattern of that prefix (and
``delete_run_keys``'s scan) covers them as before. Versions written before the tag
(``snapshot:V:manifest``, ``snapshot:V:chunk:I``) are named by :meth:`RunKeys.legacy_snapshot`,
only so that an upgraded coordinator deletes them.

AMQP: clients publish to the direct exchange ``asyncloco.R.deltas.in`` (a volunteer's broker user
may write to it and to nothing else), bound to the durable queue ``asyncloco.R.deltas``; rejected
deltas go to the dead-letter queue ``asyncloco.R.deltas.dead`` through the exchange
``asyncloco.R.dlx``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from shared.errors import ConfigError

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A run's delta queues at most (--delta-queues): one per broker node of a cluster is the point.
MAX_DELTA_QUEUES = 16


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

    def snapshot_key(self, version: int, item: str) -> str:
        """The key of ``item`` (``manifest``, ``chunk:I``) of snapshot ``version``: the one place
        they are built. The hash tag ``{RUN:vVERSION}`` puts a version's keys in one cluster slot."""
        return f"{self.prefix}snapshot:{{{self.run}:v{version}}}:{item}"

    def manifest(self, version: int) -> str:
        return self.snapshot_key(version, "manifest")

    def chunk(self, version: int, index: int) -> str:
        return self.snapshot_key(version, f"chunk:{index}")

    def patch_manifest(self, version: int) -> str:
        """The manifest of the patch from ``version - 1`` to ``version`` (:mod:`shared.snapshot_patch`):
        in the version's own slot, so it goes with the version."""
        return self.snapshot_key(version, "patch")

    def patch_chunk(self, version: int, index: int) -> str:
        return self.snapshot_key(version, f"patch:{index}")

    @property
    def snapshot_pattern(self) -> str:
        """Glob of every snapshot key of the run, in either layout (a volunteer's ACL key pattern)."""
        return f"{self.prefix}snapshot:*"

    def legacy_snapshot(self, version: int, item: str) -> str:
        """``item`` of ``version`` as written before the hash tag (one slot per key in a cluster):
        only for deleting what a coordinator of that layout left behind."""
        return f"{self.prefix}snapshot:{version}:{item}"

    @property
    def current(self) -> str:
        return f"{self.prefix}current"

    @property
    def plan(self) -> str:
        return f"{self.prefix}plan"

    @property
    def status(self) -> str:
        return f"{self.prefix}status"

    def verdicts(self, client_id: str) -> str:
        return f"{self.prefix}verdicts:{client_id}"

    @property
    def coordinator_lease(self) -> str:
        return f"{self.prefix}coordinator"

    # AMQP names
    @property
    def delta_exchange(self) -> str:
        return f"asyncloco.{self.run}.deltas.in"

    @property
    def delta_queue(self) -> str:
        """The run's (first) delta queue; with several (``--delta-queues``), :meth:`delta_queues`."""
        return f"asyncloco.{self.run}.deltas"

    def delta_queues(self, count: int) -> list[str]:
        """The run's ``count`` delta queues: the first is :attr:`delta_queue`, the others
        ``…deltas.q1`` and on, each bound to the delta exchange under its own name."""
        return [self.delta_queue] + [f"{self.delta_queue}.q{i}" for i in range(1, count)]

    def delta_queue_for(self, client_id: str, count: int) -> str:
        """The queue of ``count`` that ``client_id`` sends to: always the same one for the same
        count, so that its own deltas (and a delta's parts) stay in order."""
        if count <= 1:
            return self.delta_queue
        return self.delta_queues(count)[zlib.crc32(client_id.encode()) % count]

    @property
    def dead_letter_exchange(self) -> str:
        return f"asyncloco.{self.run}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"asyncloco.{self.run}.deltas.dead"
