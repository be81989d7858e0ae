"""The coordinator service: the loop that feeds deliveries to the run's state and commits it.

One thread (this one) applies deltas and commits; the consumer thread does all AMQP I/O. A commit
is: checkpoint to disk (atomic) → settle the deliveries it includes (ack / dead-letter) → publish
the new snapshot and plan to Redis. So a delta confirmed to a client is either in a checkpoint or
still in the queue, and a redelivered one is recognised by its (client id, seq). What the run *is*
(θ, optimizer, registry, counters, mode) lives in :class:`coordinator.run_state.RunState`.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import redis

from coordinator.applied_log import AppliedLog
from coordinator.broker_admin import restore_redis_users
from coordinator.checkpoint import load_checkpoint, save_checkpoint
from coordinator.commit_batch import CommitBatch
from coordinator.config import CoordinatorConfig
from coordinator.consumer import Delivery, DeltaConsumer
from coordinator.dashboard import Dashboard
from coordinator.faults import CrashPoints
from coordinator.lease import CoordinatorLease
from coordinator.memory_trim import trim as trim_memory
from coordinator.metrics import CoordinatorMetrics
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.parts import PartSpool, take_part
from coordinator.publisher import Publisher
from coordinator.run_state import RunState
from coordinator.status import build_status
from shared.contact import ServerContact
from shared.delta_parts import PART_TYPE
from shared.errors import CheckpointUnusable, ConfigError, ProtocolError, RunTaken, SnapshotError
from shared.keys import RunKeys
from shared.settings import REDIS_ERRORS
from shared.signing import SigningKey

log = logging.getLogger(__name__)
# How often the coordinator looks for invited volunteers' Redis users that Redis lost (one ACL USERS).
USER_CHECK_S = 30.0


class Coordinator:
    """Serve one run until stopped; see the module docstring for the commit cycle.

    ``redis`` is the client for the run's keys (the caller owns and closes it); ``signing_key``
    signs every snapshot manifest and plan (clients pin its public half); ``crash`` holds the
    fault tests' kill -9 points (inert unless a test asks for one).
    """

    def __init__(self, config: CoordinatorConfig, *, redis: redis.Redis, signing_key: SigningKey,
                 crash: CrashPoints | None = None) -> None:
        self.config = config
        self.keys = RunKeys(config.run)
        self.redis = redis
        self.crash = crash or CrashPoints(None)
        self.signing_key = signing_key
        self.consumer: DeltaConsumer | None = None
        self.state: RunState | None = None  # built by setup()
        self.metrics = CoordinatorMetrics(config.metrics, run=lambda: self.state,
                                          consumer=lambda: self.consumer)
        self.dashboard = Dashboard(config.dashboard)  # shows each status document status() builds
        self.publisher = Publisher(redis, self.keys, keep_versions=config.commit.keep_versions,
                                   signing_key=signing_key, on_published=self.metrics.published,
                                   patch_codec=config.commit.patch_codec_or_none)
        self.lease = CoordinatorLease(redis, self.keys.coordinator_lease)
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self.batch = CommitBatch(config.commit)
        # Parts of big deltas wait here; beside the checkpoint, so that they survive a crash with it.
        self._own_spool_dir = config.checkpoint_dir is None
        spool_dir = (config.checkpoint_dir / "parts" if config.checkpoint_dir is not None
                     else Path(tempfile.mkdtemp(prefix="asyncloco-parts-")))
        self.spool = PartSpool(spool_dir, config.spool)
        self._next_user_check = 0.0  # time.monotonic() of the next look for lost volunteer users

    @property
    def run(self) -> RunState:
        assert self.state is not None, "setup() builds the run's state"
        return self.state

    @property
    def version(self) -> int:
        return self.state.version if self.state is not None else 0

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Build or restore the run's state, take the run's lease, publish the first snapshot."""
        cfg = self.config
        checkpoint = load_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        if checkpoint is not None and not cfg.resume:
            raise CheckpointUnusable(
                f"a checkpoint of run {cfg.run!r} (version {checkpoint.version}) exists in "
                f"{cfg.checkpoint_dir}; pass --resume to continue it, or --fresh to start over"
            )
        if checkpoint is None and cfg.resume:
            raise CheckpointUnusable(f"--resume: no checkpoint of run {cfg.run!r} in {cfg.checkpoint_dir}; "
                                     "start without --resume to begin a new run")
        applied_log = AppliedLog(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.state = run = RunState.open(cfg, checkpoint, applied_log)
        self._first_contact_with_redis()
        redis_version = self.publisher.store.current_version()
        first = max(run.version, -1 if redis_version is None else redis_version) + 1
        if checkpoint is None and redis_version is None:
            first = 0
        log.info("%s run %s (%s): %d parameters, starting at version %d",
                 "resuming" if checkpoint else "starting", cfg.run, run.run_id,
                 sum(p.numel() for p in run.optimizer.params.values()), first)
        if checkpoint is None and cfg.guard_seeds:  # after Redis said yes: a mistake there ends at once
            run.seed_guard()
        if checkpoint is None and cfg.guard_starts_blind:
            log.warning("the guard starts blind: with --no-guard-seed-round and no --warm-start-steps by "
                        "a --warm-start-client you trust, a fast volunteer that lies from the start can "
                        "steer the run before the guard has statistics to judge it by (docs/SECURITY.md); "
                        "keep the seed round, or start with a warm start from a machine of your own")
        run.start_at(first)
        run.evaluate()
        self._commit(force=True)

    def _first_contact_with_redis(self) -> None:
        """Take the run's lease: the first command to Redis. A mistake there that no restart can
        cure (credentials refused, unknown host, nothing listening) raises its PermanentError."""
        refused: tuple[type[Exception], ...] = (*REDIS_ERRORS, redis.exceptions.ResponseError)  # NOPERM
        try:
            self.lease.acquire()
        except refused as exc:
            refusal = ServerContact(self.config.connection.redis_url, option="--redis",
                                    token=False).refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise

    # ---------------------------------------------------------------- main loop
    def serve(self) -> None:
        """Run until :meth:`stop` (or ``max_seconds``); commit what was applied before returning."""
        self.metrics.start()  # first: a metrics port already taken fails before anything changes
        try:
            self.dashboard.start()  # so does a dashboard port
            self._serve()
        finally:
            self.dashboard.stop()
            self.metrics.stop()

    def _serve(self) -> None:
        cfg = self.config
        self.setup()
        for key in self.spool.recover(time.time()):  # complete deltas a crash left in the spool
            self._take_assembled(key)
        self.consumer = DeltaConsumer(
            connection=cfg.connection, keys=self.keys, config=cfg.queue, retry=cfg.retry,
            inbox=self.inbox,
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
                    self._take(self.inbox.get(timeout=0.1))
                except queue.Empty:
                    pass
                if self.run.sync_round_due(time.time()):
                    arrived = self.run.complete_sync_round()
                    log.info("sync round on version %d complete with %d deltas", self.run.version, arrived)
                    self._commit()
                if self.batch.due(inbox_empty=self.inbox.empty()):
                    self._commit()
                now = time.monotonic()
                if now >= next_eval and self.run.eval_is_stale():
                    self.run.evaluate()  # the committed version, whichever strategy moved it
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
            self._hold(delivery, self._handle(delivery.body, sender=delivery.sender))
            return
        outcome, complete = take_part(self.spool, self.run.intake, delivery.body, time.time(),
                                      sender=delivery.sender)
        if outcome.kind in (OutcomeKind.SPOOLED, OutcomeKind.COMPLETE):
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
            outcome = Outcome.rejected(exc.reason, exc.detail, entry.client_id, entry.seq)
            self.run.intake.count(outcome)
        else:
            outcome = self._handle(body, parts_of=(entry.client_id, entry.seq))
            del body
            trim_memory()  # a delta in parts is a big one: what judging it freed goes back to the OS
        self._hold(Delivery.from_spool(key), outcome)

    def _handle(self, body: bytes, *, sender: str = "", parts_of: tuple[str, int] | None = None) -> Outcome:
        """One whole delta through the intake, timed for the metrics."""
        started = time.monotonic()
        outcome = self.run.intake.handle(body, sender=sender, parts_of=parts_of)
        self.metrics.delta_handled(outcome, time.monotonic() - started)
        return outcome

    def _hold(self, delivery: Delivery, outcome: Outcome) -> None:
        """Keep an outcome for the next commit, which records it and settles its delivery."""
        if outcome.kind is OutcomeKind.APPLIED:
            self.crash.hit("after_apply")
        self.batch.add(delivery, outcome)

    def _expire_parts(self) -> None:
        """Discard deltas whose parts stopped coming; each is recorded as rejected, ``incomplete``."""
        for entry in self.spool.expire(time.time()):
            outcome = Outcome.rejected("incomplete", entry.expired, entry.client_id, entry.seq)
            self.run.intake.count(outcome)
            self._hold(Delivery.from_spool(""), outcome)

    # ---------------------------------------------------------------- commit
    def _commit(self, *, force: bool = False) -> None:
        """Checkpoint → settle → publish. A commit that did not change θ keeps the version (nothing
        applied, or deltas only buffered: FedBuff before its buffer fills, a sync round not done)."""
        started = time.monotonic()
        self._check_lease()
        run = self.run
        batch = self.batch.take()
        if run.warm_start_ended():
            log.info("warm start done after %d local steps; %s takes over from here",
                     run.progress.local_steps, self.config.outer.strategy)
        theta_changed = run.advance_version()
        if self.config.checkpoint_dir is not None and (theta_changed or batch or force):
            if run.applied_log is not None and batch:
                # Before the checkpoint, which records the log's new length: see applied_log.py.
                run.applied_log.append(
                    {"id": o.delta_id, "outcome": o.kind.value, "reason": o.reason, "version": run.version}
                    for _, o in batch
                )
            save_checkpoint(self.config.checkpoint_dir, run.checkpoint(),
                            on_partial=lambda: self.crash.hit("mid_checkpoint"))
            self.crash.hit("after_checkpoint")
        if self.consumer is not None and batch:
            self.consumer.settle(batch)
            self.crash.hit("after_ack")
        for delivery, _ in batch:
            if delivery.spool_key:  # settled for good by this commit
                self.spool.discard(delivery.spool_key)
        if theta_changed or force:
            self.publisher.publish(run, before_flip=lambda: self.crash.hit("mid_snapshot"))
            run.published(self.publisher.published_version, time.time())  # clients' speeds count from it
        run.commits += 1
        seconds = time.monotonic() - started
        self.batch.committed(seconds)
        self.metrics.committed(seconds)
        kinds = [o.kind for _, o in batch]
        if OutcomeKind.APPLIED in kinds or theta_changed or force:
            depth = self.consumer.queue_depth if self.consumer else None
            log.info(
                "commit v=%d applied=%d rejected=%d duplicate=%d (total applied %d, rejected %d) "
                "active=%d eval=%.4f queue=%s %.2fs",
                run.version, kinds.count(OutcomeKind.APPLIED), kinds.count(OutcomeKind.REJECTED),
                kinds.count(OutcomeKind.DUPLICATE), run.intake.counts["applied"],
                run.intake.counts["rejected"], len(run.registry.active(time.time())), run.latest_eval,
                "?" if depth is None else depth, seconds,
            )

    def _check_lease(self) -> None:
        """Before writing anything: make sure the run is still ours if the lease may have lapsed
        (this process was paused, or the loop stalled, for a good part of its TTL)."""
        if not self.lease.stale():
            return
        try:
            ours = self.lease.refresh()
            current = self.publisher.store.current_version()
        except REDIS_ERRORS:
            return  # Redis is down: nobody can take the run over through it; commit locally
        if not ours:
            raise RunTaken("another coordinator took over this run; stopping before this commit")
        if current is not None and current > self.run.version:
            raise RunTaken(f"another coordinator published version {current} while this one was "
                           f"paused at {self.run.version}; stopping before this commit")

    # ---------------------------------------------------------------- housekeeping
    def status(self, *, stopped: bool = False) -> dict[str, object]:
        """The status document (docs/STATUS.md); the dashboard shows the newest one built."""
        doc = build_status(self.run, consumer=self.consumer, spool=self.spool,
                           started_at=self.started_at, stopped=stopped)
        self.dashboard.show(doc)
        return doc

    def _restore_volunteer_users(self) -> None:
        """Every USER_CHECK_S: give Redis back the invited volunteers' users it lost (a restart
        without an ACL file), so that they read snapshots again without a new invitation."""
        volunteers = self.run.volunteers
        if volunteers is None or time.monotonic() < self._next_user_check:
            return
        self._next_user_check = time.monotonic() + USER_CHECK_S
        try:
            restored = restore_redis_users(self.redis, self.keys, volunteers.volunteers.values(), time.time())
        except redis.exceptions.ResponseError as exc:  # no +acl: said once an hour
            self._next_user_check = time.monotonic() + 3600
            log.warning("cannot check the volunteers' Redis users (%s): the coordinator's Redis user "
                        "needs +acl", exc)
            return
        if restored:
            log.warning("Redis had lost the users of %d invited volunteers (restarted without an ACL "
                        "file?); created them again: %s", len(restored), ", ".join(sorted(restored)))

    def _housekeeping(self) -> None:
        """Keep the lease, the plan and the status fresh; republish if Redis lost our snapshot;
        see what `invite` and `revoke` changed in the volunteer book."""
        run = self.run
        if run.volunteers is not None and run.volunteers.reload():
            log.info("volunteer book read: %d volunteers", len(run.volunteers.volunteers))
        try:
            if not self.lease.refresh():
                raise RunTaken("another coordinator took over this run; stopping")
            lost, current = self.publisher.snapshot_lost(run)
            published = self.publisher.published_version
            if lost or current is None or current < run.version or published < run.version:
                if lost and published >= 0:
                    log.warning("Redis lost snapshot %d (restart or flush); republishing", run.version)
                if self.batch.holds_applied():
                    # θ already holds deltas that no checkpoint has: commit them as a new version
                    # rather than publish them under the old version's number.
                    self._commit()
                else:
                    self.publisher.publish(run, republish=current == run.version)
                    run.published(self.publisher.published_version, time.time())
            self.publisher.refresh(run, self.status())
            self._restore_volunteer_users()
            self.publisher.reachable()
        except REDIS_ERRORS as exc:
            self.publisher.unreachable(f"Redis unreachable ({exc}); training goes on, snapshots wait")
            self.status()  # the dashboard stays live while Redis is away
        except SnapshotError as exc:
            raise ConfigError(str(exc)) from exc

    def _shutdown(self) -> None:
        if self.state is not None:
            if self.batch:
                self._commit()
            if self.state.eval_is_stale():
                log.info("final eval of version %d: %.4f", self.state.version, self.state.evaluate())
        if self.consumer is not None:
            time.sleep(0.3)  # let the I/O thread send the last acks
            self.consumer.stop()
            self.consumer.join(timeout=5)
        try:
            if self.state is not None:
                self.publisher.refresh(self.state, self.status(stopped=True))
            self.lease.release()
        except REDIS_ERRORS:
            pass
        if self._own_spool_dir:
            shutil.rmtree(self.spool.directory, ignore_errors=True)
