"""The deliveries handled since the last commit, and when the next commit is due."""

from __future__ import annotations

import time
from dataclasses import dataclass

from coordinator.consumer import Delivery
from coordinator.outcome import Outcome, OutcomeKind
from shared.errors import ConfigError
from shared.snapshot_patch import DEFAULT_PATCH_CODEC, PATCH_CODECS


@dataclass(frozen=True)
class CommitConfig:
    """When to commit (checkpoint, publish a snapshot, then ack what it includes).

    A commit happens once ``every_updates`` deltas were handled, or ``interval_s`` after the first
    uncommitted one, or as soon as no delivery is waiting and ``idle_interval_s`` passed since the
    last commit: under light load every delta is published at once (clients start their next round
    from a model that includes their last delta), under heavy load commits batch up. Fresher
    snapshots mean less staleness but more disk and Redis writes.

    The cadence adapts to the model's size and the machine's load: commits start at least their
    own recent duration / ``max_share`` apart (whatever the three rules above say), so committing
    takes at most ``max_share`` of the coordinator's time. A 100M-parameter model whose commit
    takes 1.5 s then commits every 6 s at most, not every 0.25 s; a small one is not held back.

    ``keep_versions``: snapshots Redis holds, counting the one being written (the oldest is
    deleted when the next starts), so Redis needs about ``keep_versions`` times the snapshot's
    bytes. A client must read a snapshot before the ``keep_versions``-th newer one starts: if
    clients keep starting their reads over ("expired while reading" in their debug log: a big
    model, a slow link, frequent commits), raise it or the commit intervals.
    """

    every_updates: int = 16
    interval_s: float = 2.0
    idle_interval_s: float = 0.25
    keep_versions: int = 3
    max_share: float = 0.25
    # the codec of the patch published with each snapshot (shared/snapshot_patch.py); "none": none
    patch_codec: str = DEFAULT_PATCH_CODEC

    @property
    def patch_codec_or_none(self) -> str | None:
        return None if self.patch_codec == "none" else self.patch_codec

    def __post_init__(self) -> None:
        if self.every_updates < 1 or self.interval_s <= 0 or self.keep_versions < 1:
            raise ConfigError("commit every_updates >= 1, interval_s > 0, keep_versions >= 1")
        if self.patch_codec not in (*PATCH_CODECS, "none"):
            raise ConfigError(f"snapshot patches: one of {', '.join(PATCH_CODECS)} or none")
        if not 0 < self.max_share <= 1:
            raise ConfigError("commit max_share must be in (0, 1]")
        if not 0 <= self.idle_interval_s <= self.interval_s:
            raise ConfigError("commit idle_interval_s must be within [0, interval_s]")
class CommitBatch:
    """Outcomes waiting for the commit that records them and settles their deliveries."""

    def __init__(self, config: CommitConfig) -> None:
        self.config = config
        self.items: list[tuple[Delivery, Outcome]] = []
        self.first_at = 0.0  # time.monotonic() of the oldest uncommitted outcome
        self.last_commit_at = 0.0  # time.monotonic() of the last commit
        self.cost_s = 0.0  # a running mean of recent commits' durations

    def __len__(self) -> int:
        return len(self.items)

    def add(self, delivery: Delivery, outcome: Outcome) -> None:
        if not self.items:
            self.first_at = time.monotonic()
        self.items.append((delivery, outcome))

    def take(self) -> list[tuple[Delivery, Outcome]]:
        """Everything held, for the commit that starts now; the batch is empty afterwards."""
        items, self.items = self.items, []
        return items

    def committed(self, seconds: float = 0.0) -> None:
        """A commit that took ``seconds`` just ended."""
        self.last_commit_at = time.monotonic()
        self.cost_s = seconds if not self.cost_s else 0.5 * (self.cost_s + seconds)

    @property
    def min_gap_s(self) -> float:
        """The least time between commits that keeps committing within ``max_share``."""
        return self.cost_s / self.config.max_share - self.cost_s

    def holds_applied(self) -> bool:
        """True when θ holds deltas that no checkpoint has yet."""
        return any(o.kind is OutcomeKind.APPLIED for _, o in self.items)

    def due(self, *, inbox_empty: bool) -> bool:
        """True when a commit is due: see :class:`CommitConfig`."""
        if not self.items:
            return False
        now = time.monotonic()
        since_commit = now - self.last_commit_at
        if since_commit < self.min_gap_s:
            return False
        return (len(self.items) >= self.config.every_updates
                or now - self.first_at >= self.config.interval_s
                or (inbox_empty and since_commit >= self.config.idle_interval_s))
