"""The coordinator's resolved configuration: CLI options → this frozen dataclass → constructors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.consumer import QueueConfig
from coordinator.faults import parse_crash_at
from coordinator.intake import IntakeConfig
from coordinator.outer_optimizer import OuterConfig
from coordinator.parts import SpoolConfig
from coordinator.registry import PlanConfig
from shared.errors import ConfigError
from shared.keys import validate_run_name
from shared.local_round import InnerConfig
from shared.settings import ConnectionSettings, RetryPolicy


@dataclass(frozen=True)
class CommitConfig:
    """When to commit (checkpoint, publish a snapshot, then ack what it includes).

    A commit happens once ``every_updates`` deltas were handled, or ``interval_s`` after the first
    uncommitted one, or as soon as no delivery is waiting and ``idle_interval_s`` passed since the
    last commit: under light load every delta is published at once (clients start their next round
    from a model that includes their last delta), under heavy load commits batch up. Fresher
    snapshots mean less staleness but more disk and Redis writes; with big models raise both.
    """

    every_updates: int = 16
    interval_s: float = 2.0
    idle_interval_s: float = 0.25
    keep_versions: int = 3

    def __post_init__(self) -> None:
        if self.every_updates < 1 or self.interval_s <= 0 or self.keep_versions < 1:
            raise ConfigError("commit every_updates >= 1, interval_s > 0, keep_versions >= 1")
        if not 0 <= self.idle_interval_s <= self.interval_s:
            raise ConfigError("commit idle_interval_s must be within [0, interval_s]")


@dataclass(frozen=True)
class CoordinatorConfig:
    run: str = "default"
    task: str = "bytelm"
    task_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    inner: InnerConfig = InnerConfig()
    outer: OuterConfig = OuterConfig()
    plan: PlanConfig = PlanConfig()
    intake: IntakeConfig = IntakeConfig()
    commit: CommitConfig = CommitConfig()
    queue: QueueConfig = QueueConfig()
    spool: SpoolConfig = SpoolConfig()
    connection: ConnectionSettings = ConnectionSettings()
    retry: RetryPolicy = RetryPolicy()
    checkpoint_dir: Path | None = None
    resume: bool = False
    # sync strategy: a round waits this long after its first delta for missing clients
    sync_timeout_s: float = 120.0
    eval_interval_s: float = 10.0
    max_seconds: float = 0.0  # 0: serve until stopped
    device: str = "cpu"  # where evaluation runs
    crash_at: str | None = None  # fault tests only: "POINT[:N]", see coordinator/faults.py

    def __post_init__(self) -> None:
        validate_run_name(self.run)
        if self.queue.prefetch <= self.commit.every_updates:
            raise ConfigError(
                f"prefetch ({self.queue.prefetch}) must exceed commit every-updates "
                f"({self.commit.every_updates}): deliveries stay unacked until their commit"
            )
        if (self.outer.strategy == "sync") != self.plan.sync:
            raise ConfigError("the sync strategy and the plan's sync flag must agree")
        if self.plan.warm_start_steps and self.plan.sync:
            raise ConfigError("--warm-start-steps is for the asynchronous strategies, not sync")
        if self.sync_timeout_s <= 0:
            raise ConfigError("sync timeout must be > 0")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs --checkpoint-dir")
        if self.eval_interval_s <= 0 or self.max_seconds < 0:
            raise ConfigError("eval interval must be > 0 and max seconds >= 0")
        if self.crash_at is not None:
            parse_crash_at(self.crash_at)
