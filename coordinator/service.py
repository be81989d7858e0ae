"""The coordinator service: owns θ, the outer optimizer, the version counter and the commit cycle.

One thread (this one) applies deltas and commits; the consumer thread does all AMQP I/O. A commit
is: checkpoint to disk (atomic) → settle the deliveries it includes (ack / dead-letter) → publish
the new snapshot and plan to Redis. So a delta confirmed to a client is either in a checkpoint or
still in the queue, and a redelivered one is recognised by its (client id, seq).
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import redis
import torch

from coordinator.applied_log import AppliedLog
from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.consumer import Delivery, DeltaConsumer
from coordinator.faults import CrashPoints
from coordinator.intake import DeltaIntake, Outcome
from coordinator.lease import CoordinatorLease
from coordinator.outer_optimizer import make_outer_optimizer
from coordinator.parts import PartSpool, take_part
from coordinator.registry import ClientRegistry
from coordinator.status import build_status, publish_status
from coordinator.sync_round import SyncBarrier
from coordinator.warm_start import WarmStart
from shared.errors import ConfigError, ProtocolError, SnapshotError
from shared.keys import RunKeys
from shared.protocol import PART_TYPE, RoundPlan
from shared.snapshot import SnapshotStore
from shared.tasks import load_task

log = logging.getLogger(__name__)

EVAL_HISTORY = 500
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Coordinator:
    """Serve one run until stopped; see the module docstring for the commit cycle."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.keys = RunKeys(config.run)
        self.redis = redis.Redis.from_url(
            config.connection.redis_url,
            socket_timeout=config.connection.socket_timeout_s,
            socket_connect_timeout=config.connection.socket_timeout_s,
        )
        self.store = SnapshotStore(self.redis, self.keys, keep_versions=config.commit.keep_versions)
        self.lease = CoordinatorLease(self.redis, self.keys.coordinator_lease)
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self.version = 0
        self.published_version = -1
        self.eval_history: list[list[float]] = []  # [version, unix time, loss]
        self.uncommitted: list[tuple[Delivery, Outcome]] = []
        self.first_uncommitted_at = 0.0
        self.commits = 0
        self._theta_committed = 0  # optimizer.theta_updates at the last commit
        self.last_commit_at = 0.0
        self.consumer: DeltaConsumer | None = None
        self._redis_down = False
        self.crash = CrashPoints(config.crash_at)  # test-only kill -9 points; inert by default
        self.applied_log = AppliedLog(config.checkpoint_dir) if config.checkpoint_dir else None
        # Parts of big deltas wait here; beside the checkpoint, so that they survive a crash with it.
        self._own_spool_dir = config.checkpoint_dir is None
        spool_dir = (config.checkpoint_dir / "parts" if config.checkpoint_dir is not None
                     else Path(tempfile.mkdtemp(prefix="asyncloco-parts-")))
        self.spool = PartSpool(spool_dir, config.spool)

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Build or restore the model and state, take the run's lease, publish the first snapshot."""
        cfg = self.config
        checkpoint = load_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        if checkpoint is not None and not cfg.resume:
            raise ConfigError(
                f"a checkpoint of run {cfg.run!r} (version {checkpoint.version}) exists in "
                f"{cfg.checkpoint_dir}; pass --resume to continue it, or --fresh to start over"
            )
        if checkpoint is not None:
            run_config = checkpoint.state["run_config"]
            self.run_id = checkpoint.state["run_id"]
        else:
            run_config = {
                "task": cfg.task,
                "task_settings": dict(cfg.task_settings),
                "inner": asdict(cfg.inner),
                "seed": cfg.seed,
            }
            self.run_id = f"{cfg.run}-{uuid.uuid4().hex[:12]}"
        self.run_config = run_config
        torch.manual_seed(int(run_config["seed"]))
        self.task = load_task(run_config["task"], run_config["task_settings"])
        self.run_config["task_settings"] = self.task.settings_dict()  # defaults filled in
        self.device = torch.device(cfg.device)
        self.eval_model = self.task.build_model().to(self.device)
        params = dict(self.eval_model.named_parameters())
        self.optimizer = make_outer_optimizer(params, cfg.outer)
        self.registry = ClientRegistry(cfg.plan)
        self.barrier = SyncBarrier(timeout_s=cfg.sync_timeout_s) if cfg.outer.strategy == "sync" else None
        self.warm = WarmStart(cfg.plan.warm_start_steps) if cfg.plan.warm_start_steps else None
        self.intake = DeltaIntake(
            config=cfg.intake, optimizer=self.optimizer, registry=self.registry, run_id=self.run_id,
            barrier=self.barrier, warm=self.warm,
        )
        if checkpoint is not None:
            self._restore(checkpoint)
        self._warm_done = not self.intake.warming_up
        if self.applied_log is not None:
            # Entries past the checkpoint's recorded length belong to a batch that never committed.
            length = checkpoint.state.get("applied_log_bytes", 0) if checkpoint is not None else 0
            self.applied_log.reset(int(length))
        self.lease.acquire()
        redis_version = self.store.current_version()
        first = max(self.version, -1 if redis_version is None else redis_version) + 1
        if checkpoint is None and redis_version is None:
            first = 0
        log.info(
            "%s run %s (%s): %d parameters, starting at version %d",
            "resuming" if checkpoint else "starting", cfg.run, self.run_id,
            sum(p.numel() for p in self.optimizer.params.values()), first,
        )
        self.version = first
        self.intake.version = first
        if self.barrier is not None:
            # θ does not move inside a sync round, so version `first` is the resumed round's base.
            self.barrier.base_version = first
        self._evaluate()
        self._commit(force=True)

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        self.optimizer.load_tensors(
            checkpoint.tensors, pending=int(state["outer_pending"]), arrivals=int(state["outer_arrivals"])
        )
        self.registry.load_json(state["clients"])
        self.intake.counts.update(state["counts"])
        self.intake.rejected_by_reason.update(state["rejected_by_reason"])
        self.intake.progress.update(state["progress"])
        self.eval_history = state["eval_history"]
        self.version = checkpoint.version
        self.commits = int(state.get("commits", 0))
        if self.warm is not None and state.get("warm_start"):
            self.warm.load_json(state["warm_start"])
        if self.barrier is not None and state.get("sync_barrier"):
            self.barrier.load_json(state["sync_barrier"], time.time())

    # ---------------------------------------------------------------- main loop
    def serve(self) -> None:
        """Run until :meth:`stop` (or ``max_seconds``); commit what was applied before returning."""
        cfg = self.config
        self.setup()
        for key in self.spool.recover(time.time()):  # complete deltas a crash left in the spool
            self._take_assembled(key)
        self.consumer = DeltaConsumer(
            amqp_url=cfg.connection.amqp_url, keys=self.keys, config=cfg.queue, retry=cfg.retry,
            inbox=self.inbox, heartbeat_s=cfg.connection.heartbeat_s,
        )
        self.consumer.start()
        deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else math.inf
        next_eval = time.monotonic() + cfg.eval_interval_s
        next_housekeeping = 0.0
        try:
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                if self.consumer.fatal is not None:
                    raise self.consumer.fatal
                try:
                    delivery: Delivery | None = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    delivery = None
                if delivery is not None:
                    self._take(delivery)
                if self.barrier is not None and self.barrier.ready(
                    self.registry.in_contact(time.time()), time.time()
                ):
                    self._complete_sync_round()
                now = time.monotonic()
                if self.uncommitted and (
                    len(self.uncommitted) >= cfg.commit.every_updates
                    or now - self.first_uncommitted_at >= cfg.commit.interval_s
                    or (self.inbox.empty() and now - self.last_commit_at >= cfg.commit.idle_interval_s)
                ):
                    self._commit()
                if now >= next_eval and self._eval_is_stale():
                    self._evaluate()  # the committed version, whichever strategy moved it
                    next_eval = now + cfg.eval_interval_s
                if now >= next_housekeeping:
                    self._expire_parts()
                    self._housekeeping()
                    next_housekeeping = now + 1.0
        finally:
            self._shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    # ---------------------------------------------------------------- intake
    def _take(self, delivery: Delivery) -> None:
        """Handle one delivery: a whole delta waits for the next commit; a part is spooled."""
        if delivery.message_type != PART_TYPE:
            self._hold(delivery, self.intake.handle(delivery.body))
            return
        outcome, complete = take_part(self.spool, self.intake, delivery.body, time.time())
        if outcome.kind in ("spooled", "complete"):
            self.crash.hit("part_spooled")
        if self.consumer is not None:
            self.consumer.settle([(delivery, outcome)])  # on disk (or refused) now: settle at once
        if complete:
            self._take_assembled(complete)

    def _take_assembled(self, key: str) -> None:
        entry = self.spool.entries[key]
        try:
            body = self.spool.assemble(key)
        except ProtocolError as exc:
            outcome = Outcome("rejected", exc.reason, exc.detail, entry.client_id, entry.seq)
            self.intake.count(outcome)
        else:
            outcome = self.intake.handle(body, assembled=True)
        self._hold(Delivery.from_spool(key), outcome)

    def _hold(self, delivery: Delivery, outcome: Outcome) -> None:
        """Keep an outcome for the next commit, which records it and settles its delivery."""
        if outcome.kind == "applied":
            self.crash.hit("after_apply")
        if not self.uncommitted:
            self.first_uncommitted_at = time.monotonic()
        self.uncommitted.append((delivery, outcome))

    def _expire_parts(self) -> None:
        """Discard deltas whose parts stopped coming; each is recorded as rejected, ``incomplete``."""
        for entry in self.spool.expire(time.time()):
            detail = (f"{len(entry.parts)} of {entry.count} parts, none new for "
                      f"{self.spool.config.timeout_s:.0f} s")
            outcome = Outcome("rejected", "incomplete", detail, entry.client_id, entry.seq)
            self.intake.count(outcome)
            self._hold(Delivery.from_spool(""), outcome)

    def _complete_sync_round(self) -> None:
        """All active clients sent (or the round timed out): one Nesterov step, a new version."""
        assert self.barrier is not None
        arrived = len(self.barrier.arrived)
        self.optimizer.complete_round()
        self.barrier.next_round(self.version + 1)  # the version this commit publishes
        log.info("sync round on version %d complete with %d deltas", self.version, arrived)
        self._commit()

    def _applied_pending(self) -> bool:
        return any(o.kind == "applied" for _, o in self.uncommitted)

    # ---------------------------------------------------------------- commit
    def _commit(self, *, force: bool = False) -> None:
        """Checkpoint → settle → publish. A commit that did not change θ keeps the version (nothing
        applied, or deltas only buffered: FedBuff before its buffer fills, a sync round not done)."""
        started = time.monotonic()
        self._check_lease()
        batch, self.uncommitted = self.uncommitted, []
        applied = sum(1 for _, o in batch if o.kind == "applied")
        theta_changed = self.optimizer.theta_updates != self._theta_committed
        if not self._warm_done and not self.intake.warming_up:
            self._warm_done = True
            log.info("warm start done after %d local steps; %s takes over from here",
                     self.intake.progress["local_steps"], self.config.outer.strategy)
        if theta_changed:
            self._theta_committed = self.optimizer.theta_updates
            self.version += 1
            self.intake.version = self.version
        if self.config.checkpoint_dir is not None and (theta_changed or batch or force):
            if self.applied_log is not None and batch:
                # Before the checkpoint, which records the log's new length: see applied_log.py.
                self.applied_log.append(
                    {"id": o.delta_id, "outcome": o.kind, "reason": o.reason, "version": self.version}
                    for _, o in batch
                )
            save_checkpoint(self.config.checkpoint_dir, self._checkpoint(),
                            on_partial=lambda: self.crash.hit("mid_checkpoint"))
            self.crash.hit("after_checkpoint")
        if self.consumer is not None and batch:
            self.consumer.settle(batch)
            self.crash.hit("after_ack")
        for delivery, _ in batch:
            if delivery.spool_key:  # settled for good by this commit
                self.spool.discard(delivery.spool_key)
        if theta_changed or force:
            self._publish()
        self.commits += 1
        self.last_commit_at = time.monotonic()
        if applied or theta_changed or force:
            rejected = sum(1 for _, o in batch if o.kind == "rejected")
            duplicates = sum(1 for _, o in batch if o.kind == "duplicate")
            depth = self.consumer.queue_depth if self.consumer else None
            latest = self.eval_history[-1][2] if self.eval_history else float("nan")
            log.info(
                "commit v=%d applied=%d rejected=%d duplicate=%d (total applied %d, rejected %d) "
                "active=%d eval=%.4f queue=%s %.2fs",
                self.version, applied, rejected, duplicates, self.intake.counts["applied"],
                self.intake.counts["rejected"], len(self.registry.active(time.time())), latest,
                "?" if depth is None else depth, time.monotonic() - started,
            )

    def _check_lease(self) -> None:
        """Before writing anything: make sure the run is still ours if the lease may have lapsed
        (this process was paused, or the loop stalled, for a good part of its TTL)."""
        if not self.lease.stale():
            return
        try:
            ours = self.lease.refresh()
            current = self.store.current_version()
        except REDIS_ERRORS:
            return  # Redis is down: nobody can take the run over through it; commit locally
        if not ours:
            raise ConfigError("another coordinator took over this run; stopping before this commit")
        if current is not None and current > self.version:
            raise ConfigError(f"another coordinator published version {current} while this one was "
                              f"paused at {self.version}; stopping before this commit")

    def _publish(self, *, republish: bool = False) -> None:
        """Publish snapshot ``self.version`` and the plan; ``republish``: Redis already points at
        this version (its keys were lost, or the last publish failed after the flip), so rewrite
        it in place: θ is unchanged since, so are its chunk bytes."""
        try:
            self.store.publish(
                run_id=self.run_id, version=self.version, params=self.optimizer.params,
                config=self.run_config, progress=self.progress(), republish=republish,
                before_flip=lambda: self.crash.hit("mid_snapshot"),
            )
            self.redis.set(self.keys.plan, self.plan(time.time()).encode())
            self.published_version = self.version
            if self._redis_down:
                log.info("Redis is back; snapshot %d published", self.version)
            self._redis_down = False
        except REDIS_ERRORS as exc:
            if not self._redis_down:
                log.warning("cannot publish snapshot %d to Redis (%s); will retry", self.version, exc)
            self._redis_down = True

    def plan(self, now: float) -> RoundPlan:
        """The round plan to publish: the registry's, with the warm start's state while it lasts."""
        plan = self.registry.plan(self.run_id, now)
        if self.warm is None or not self.intake.warming_up:
            return plan
        return replace(plan, warm_start=True, warm_client=self.warm.current_holder(now))

    def progress(self) -> dict[str, Any]:
        """Global progress, and each active client's newest applied seq (so that a client can see
        its last delta is in before it starts its next round)."""
        active = self.registry.active(time.time())
        return {
            "updates": self.intake.counts["applied"],
            **self.intake.progress,
            "client_seqs": {c.client_id: c.max_seq for c in active},
        }

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(
            tensors=self.optimizer.tensors(),
            state={
                "run": self.config.run,
                "run_id": self.run_id,
                "version": self.version,
                "run_config": self.run_config,
                "outer_pending": self.optimizer.pending,
                "outer_arrivals": self.optimizer.arrivals,
                "clients": self.registry.to_json(),
                "counts": dict(self.intake.counts),
                "rejected_by_reason": dict(self.intake.rejected_by_reason),
                "progress": dict(self.intake.progress),
                "eval_history": self.eval_history[-EVAL_HISTORY:],
                "commits": self.commits,
                "sync_barrier": self.barrier.to_json() if self.barrier is not None else None,
                "warm_start": self.warm.to_json() if self.warm is not None else None,
                "applied_log_bytes": self.applied_log.length if self.applied_log else 0,
                "saved_at": time.time(),
            },
        )

    def _eval_is_stale(self) -> bool:
        """True when the newest committed version has not been evaluated yet."""
        return not self.eval_history or self.eval_history[-1][0] != self.version

    def _evaluate(self) -> float:
        with torch.no_grad():
            for name, param in self.eval_model.named_parameters():
                param.copy_(self.optimizer.params[name])
        loss = float(self.task.evaluate(self.eval_model, self.device))
        self.eval_history.append([self.version, time.time(), loss])
        del self.eval_history[:-EVAL_HISTORY]
        return loss

    # ---------------------------------------------------------------- housekeeping
    def _housekeeping(self) -> None:
        """Keep the lease, the plan and the status fresh; republish if Redis lost our snapshot."""
        try:
            if not self.lease.refresh():
                raise ConfigError("another coordinator took over this run; stopping")
            current = self.store.current_version()
            lost = current is None or (
                current == self.version and not self.redis.exists(self.keys.manifest(current))
            )
            if lost or current < self.version or self.published_version < self.version:
                if lost and self.published_version >= 0:
                    log.warning("Redis lost snapshot %d (restart or flush); republishing", self.version)
                if self._applied_pending():
                    # θ already holds deltas that no checkpoint has: commit them as a new version
                    # rather than publish them under the old version's number.
                    self._commit()
                else:
                    self._publish(republish=current == self.version)
            else:
                self.redis.set(self.keys.plan, self.plan(time.time()).encode())
            publish_status(self.redis, self.keys, build_status(self))
            self._redis_down = False
        except REDIS_ERRORS as exc:
            if not self._redis_down:
                log.warning("Redis unreachable (%s); training goes on, snapshots wait", exc)
            self._redis_down = True
        except SnapshotError as exc:
            raise ConfigError(str(exc)) from exc

    def _shutdown(self) -> None:
        if self.uncommitted:
            self._commit()
        if self._eval_is_stale():
            log.info("final eval of version %d: %.4f", self.version, self._evaluate())
        if self.consumer is not None:
            time.sleep(0.3)  # let the I/O thread send the last acks
            self.consumer.stop()
            self.consumer.join(timeout=5)
        try:
            publish_status(self.redis, self.keys, build_status(self, stopped=True))
            self.lease.release()
        except REDIS_ERRORS:
            pass
        if self._own_spool_dir:
            shutil.rmtree(self.spool.directory, ignore_errors=True)
