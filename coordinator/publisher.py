"""Publishing to Redis: the snapshot of the current version, the round plan, the status, and the
verdicts on clients' deltas (:mod:`coordinator.verdicts`).

Redis being unreachable never stops the coordinator: training goes on, a failed publish is logged
once and retried by the next commit or housekeeping pass, and "Redis is back" is said once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from coordinator.patches import PatchMaker
from coordinator.run_state import RunState
from coordinator.status import publish_status
from shared.keys import RunKeys
from shared.settings import REDIS_ERRORS
from shared.signing import SigningKey
from shared.snapshot import SnapshotStore
from shared.snapshot_patch import write_patch

log = logging.getLogger(__name__)



class Publisher:
    """Writes one run's snapshots, plan and status; remembers what Redis has of them.

    ``signing_key`` signs every manifest and plan (clients refuse anything it did not sign);
    ``on_published(version, seconds)`` is told of each publish that Redis took (the metrics).
    ``patch_codec`` (None: no patches) encodes the patch from each version to the next, for
    clients that hold the previous one (:mod:`shared.snapshot_patch`).
    """

    def __init__(self, client: redis.Redis, keys: RunKeys, *, keep_versions: int,
                 signing_key: SigningKey, on_published: Callable[[int, float], None] | None = None,
                 patch_codec: str | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.store = SnapshotStore(client, keys, keep_versions=keep_versions, signer=signing_key)
        log.info("signing snapshots and plans of run %s with coordinator key %s (clients pin it)",
                 keys.run, signing_key.public_hex)
        self.published_version = -1
        self.redis_down = False
        self.on_published = on_published
        self.patches = PatchMaker(patch_codec) if patch_codec else None
        self.patch_bytes = 0  # the last patch written (0: none)

    def publish(self, run: RunState, *, republish: bool = False,
                before_flip: Callable[[], None] | None = None) -> None:
        """Publish snapshot ``run.version`` and the plan; ``republish``: Redis already points at
        this version (its keys were lost, or the last publish failed after the flip), so rewrite
        it in place: θ is unchanged since, so are its chunk bytes."""
        try:
            started, now = time.monotonic(), time.time()
            self._write_patch(run, now)
            self.store.publish(
                run_id=run.run_id, version=run.version, params=run.optimizer.params,
                config=run.run_config, progress=run.progress_doc(now), republish=republish,
                before_flip=before_flip, created_at=now,
            )
            if self.patches is not None:
                self.patches.published(run.version, now)
            self.store.publish_plan(run.plan(now))
            self.published_version = run.version
            run.intake.verdicts.publish(self.redis, self.keys, version=run.version,  # with its snapshot
                                        cycle_open=run.cycle_open)
            if self.on_published is not None:
                self.on_published(run.version, time.monotonic() - started)
            if self.redis_down:
                log.info("Redis is back; snapshot %d published", run.version)
            self.redis_down = False
        except REDIS_ERRORS as exc:
            if self.patches is not None:
                self.patches.forget()
            self.unreachable(f"cannot publish snapshot {run.version} to Redis ({exc}); will retry")

    def _write_patch(self, run: RunState, created_at: float) -> None:
        """Write the patch to ``run.version`` from the version published before it, if there is
        one: before the snapshot's own keys, so a version that ``current`` names has its patch."""
        if self.patches is None:
            return
        made = self.patches.patch(run=self.keys.run, run_id=run.run_id, version=run.version,
                                  created_at=created_at, params=run.optimizer.params)
        self.patch_bytes = 0
        if made is not None:
            manifest, blobs = made
            write_patch(self.store, manifest, blobs)
            self.patch_bytes = manifest.total_bytes

    def snapshot_lost(self, run: RunState) -> tuple[bool, int | None]:
        """(lost, current): whether Redis lost our snapshot (a restart or flush), and its pointer."""
        current = self.store.current_version()
        lost = current is None or (
            current == run.version and not self.redis.exists(self.keys.manifest(current))
        )
        return lost, current

    def refresh(self, run: RunState, status: dict[str, object]) -> None:
        """Rewrite the plan (speeds change) and the status document; write pending rejections (a
        rejection commits no snapshot; an applied delta's verdict waits for the one that has it)."""
        self.store.publish_plan(run.plan(time.time()))
        publish_status(self.redis, self.keys, status)
        run.intake.verdicts.publish(self.redis, self.keys)

    def unreachable(self, message: str) -> None:
        """Log ``message`` once per outage."""
        if not self.redis_down:
            log.warning("%s", message)
        self.redis_down = True

    def reachable(self) -> None:
        self.redis_down = False
