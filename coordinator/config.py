"""The coordinator's resolved configuration: CLI options → this frozen dataclass → constructors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.commit_batch import CommitConfig
from coordinator.consumer import QueueConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.intake import IntakeConfig
from coordinator.outer_optimizer import OuterConfig
from coordinator.parts import SpoolConfig
from coordinator.registry import PlanConfig
from coordinator.run_mode import RunMode
from shared.errors import ConfigError
from shared.keys import validate_run_name
from shared.local_round import InnerConfig
from shared.settings import ConnectionSettings, RetryPolicy


@dataclass(frozen=True)
class MetricsConfig:
    """Where Prometheus metrics are served: ``port`` 0 serves none.

    ``host`` 127.0.0.1 keeps them on this machine; pass 0.0.0.0 (or one interface's address) for a
    Prometheus on another machine. They name every volunteer: keep them off the open internet.
    """

    port: int = 0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--metrics-port must be within 0-65535, got {self.port}")
        if self.port and not self.host:
            raise ConfigError("--metrics-host must name an address to listen on")


@dataclass(frozen=True)
class DashboardConfig:
    """Where the operator's web dashboard is served (``serve --dashboard``): ``port`` 0 serves none.

    ``host`` 127.0.0.1 keeps it on this machine (reach it from elsewhere through an SSH tunnel:
    ``ssh -L PORT:127.0.0.1:PORT coordinator-host``). It names every volunteer and has no login:
    another address puts it in front of everyone who can reach that interface.
    """

    port: int = 0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--dashboard must be a port within 0-65535, got {self.port}")
        if self.port and not self.host:
            raise ConfigError("--dashboard-host must name an address to listen on")


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
    guard: GuardConfig = GuardConfig()  # screening and clipping of deltas (coordinator/guard.py)
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
    # invite: only invited volunteers, each under its own name (the book lives in checkpoint_dir);
    # open: anyone with the broker's credentials, under any client id (a developer's machine)
    auth: AuthMode = AuthMode.INVITE
    metrics: MetricsConfig = MetricsConfig()  # /metrics for Prometheus (port 0: not served)
    dashboard: DashboardConfig = DashboardConfig()  # the operator's web page (port 0: not served)

    def __post_init__(self) -> None:
        validate_run_name(self.run)
        if self.queue.prefetch <= self.commit.every_updates:
            raise ConfigError(
                f"prefetch ({self.queue.prefetch}) must exceed commit every-updates "
                f"({self.commit.every_updates}): deliveries stay unacked until their commit"
            )
        if self.plan.warm_start_steps and self.mode is RunMode.SYNC:
            raise ConfigError("--warm-start-steps is for the asynchronous strategies, not sync")
        if self.sync_timeout_s <= 0:
            raise ConfigError("sync timeout must be > 0")
        if self.auth is AuthMode.INVITE and self.checkpoint_dir is None:
            raise ConfigError("--auth invite keeps the volunteer book in --checkpoint-dir: pass one")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs --checkpoint-dir")
        if self.eval_interval_s <= 0 or self.max_seconds < 0:
            raise ConfigError("eval interval must be > 0 and max seconds >= 0")

    @property
    def mode(self) -> RunMode:
        """Synchronous or asynchronous: derived from the outer strategy, in one place."""
        return self.outer.mode

    @property
    def trusted_warm_start(self) -> bool:
        """A warm start by a holder the operator names: its deltas are trusted from the first one (a
        warm start by whoever sends first is no trust anchor)."""
        return bool(self.plan.warm_start_steps and self.plan.warm_start_client)

    @property
    def guard_seeds(self) -> bool:
        """Whether a fresh run begins with the coordinator's own seed round (coordinator.seed_round):
        the guard screens, and no trusted warm start gives it trusted deltas already."""
        return self.guard.guard_mode.screens and self.guard.seed_round and not self.trusted_warm_start

    @property
    def guard_starts_blind(self) -> bool:
        """A run open to strangers whose guard has nothing trusted to start from: no statistic
        before its first deltas, no direction before its first buffer cycle, so a fast liar that
        sends from the start can steer the momentum it is then judged by (docs/SECURITY.md measures
        it). The seed round, or a warm start by a holder the operator names, gives the guard both
        from the first delta."""
        return (self.auth is AuthMode.INVITE and self.guard.guard_mode.screens and self.mode is RunMode.ASYNC
                and not self.guard.seed_round and not self.trusted_warm_start)
