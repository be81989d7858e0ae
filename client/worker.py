"""The client's round loop: fetch the newest snapshot, train a round sized to this machine, send g.

One round::

    v = current version          (a small GET; the snapshot itself only when v changed; newer than
                                  the last delta's base: the coordinator takes one per base)
    θ ← θ_base(v)                (load_base on a new version, else reset_to_base)
    H_i from the plan: the coordinator's assignment for this client (Dynamic Local Updates)
    train H_i inner steps        (AdamW state kept across rounds, rebuilt only for a new run)
    g = θ_base − θ               compressed with error feedback, tagged (run_id, client_id, seq, v)
    publish with confirms        (retrying the same bytes and seq until the broker confirms)
    wait for the verdict         (applied and in which version, or rejected and why: the round line)

Before the first round, :meth:`Worker.connect` reaches both servers, so that a permanent mistake
(a wrong password, host or port) ends the client at once instead of after a round of training.

The worker only orchestrates: the fetcher reads (and waits on) what the coordinator publishes,
the inclusion wait follows each send to its verdict (:mod:`client.inclusion`), the replica holds
the model and θ_base, the uploader encodes and sends, the politeness rules say when the owner
wants the machine back. It knows nothing of the terminal: it reports each round as a
:class:`RoundReport` through a callback, notices ("waiting for the first snapshot") through another,
and progress within a round to a :class:`~client.events.WorkerEvents` (the live display).

Before each round and between training steps it asks :class:`~client.politeness.Politeness`
whether to pause: a pause abandons the round in hand (no delta is sent for it), is said once, and
ends when the rules allow again, without a restart (:class:`~client.stop.PauseWait`). Between
training steps it also checks ``--max-memory`` (:mod:`client.memory_caps`): over it, the round is
abandoned the same way, said, and the next one starts at once. :class:`~client.stop.RunLimits`
says when the run is up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from client.config import ClientConfig
from client.events import RoundStart, WorkerEvents
from client.fetcher import RECENT_VERSION_S, SnapshotFetcher
from client.identity import ClientIdentity
from client.inclusion import InclusionWait
from client.memory_caps import MemoryGuard, cap_gpu_memory
from client.overlap import InFlight, MidRoundRebase, Overlap
from client.politeness import Politeness
from client.replica import Replica
from client.report import DeltaFate, RoundReport, RunSummary, Tally
from client.sender import DeltaSender
from client.stop import BaseLost, PauseWait, RoundAbandoned, RunLimits, StopRequested
from client.uploader import DeltaUploader, Upload
from shared.codecs import get_codec
from shared.contact import ServerContact
from shared.dylu import SpeedMeter, round_length
from shared.error_feedback import ErrorFeedback
from shared.keys import RunKeys
from shared.local_round import LocalTrainer, RoundStats, StepProgress, describe_device, pick_device
from shared.protocol import DeltaMessage
from shared.round_plan import RoundMode, RoundPlan
from shared.settings import connect_redis
from shared.signing import VerifyKey

log = logging.getLogger(__name__)


class Worker:
    """Runs local rounds for one run until ``max_rounds``, ``max_seconds`` or ``stop`` says enough.

    ``stop`` is the event the CLI's signal handlers set; set it from another thread to stop an
    in-process worker. ``on_notice`` gets one-line notices for the user; ``on_confirmed`` gets
    ``"client_id:seq"`` of every delta the broker confirmed, before the next round starts;
    ``events`` hears of progress within rounds and of pauses. ``politeness`` (default: built from
    ``config.politeness``, reading this machine) says when to pause. Use as a context manager (or
    call :meth:`close`) to release connections and the client-id slot.
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        stop: threading.Event | None = None,
        on_notice: Callable[[str], None] | None = None,
        on_confirmed: Callable[[str], None] | None = None,
        events: WorkerEvents | None = None,
        politeness: Politeness | None = None,
    ) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.on_notice = on_notice or (lambda text: log.info("%s", text))
        self.on_confirmed = on_confirmed
        self.events = events or WorkerEvents()
        self.politeness = politeness or Politeness(config.politeness)
        self.limits = RunLimits(self.stop, max_seconds=config.max_seconds, max_hours=config.max_hours,
                                upload_grace_s=config.upload_grace_s)
        self.keys = RunKeys(config.run)
        device = pick_device(config.device)  # before the slot lock: a bad --device takes nothing
        cap_gpu_memory(device, config.memory.max_gpu_fraction)
        self.memory = MemoryGuard(config.memory)
        self.identity = ClientIdentity.open(config.state_dir, config.client_id)
        self.redis = connect_redis(config.connection)
        self.fetcher = SnapshotFetcher(
            self.redis, self.keys, retry=config.retry, should_stop=self._should_stop,
            verify_key=VerifyKey.from_hex(config.coordinator_key), poll_s=config.poll_s,
            contact=ServerContact(config.connection.redis_url, option="--redis"),
            run_wait_s=config.run_wait_s or None,
        )
        self.waits = InclusionWait(self.fetcher, self.identity.client_id)
        self.overlap = Overlap(self.waits)  # deltas in flight while the next round trains (--overlap)
        self._fresh_base = False  # the round's base was just read from a snapshot (not held)
        self.uploader = DeltaUploader(
            config.connection, keys=self.keys, retry=config.retry, part_bytes=config.part_bytes
        )
        self.sender = DeltaSender(self.uploader, self.keys, self.identity.client_id,
                                  give_up=self.limits.give_up_upload, on_sent=self._sent)
        self.pauses = PauseWait(self.politeness, events=self.events, on_notice=self.on_notice,
                                poll_s=config.poll_s, should_stop=self._should_stop,
                                keepalive=self.sender.keepalive)
        self.replica = Replica(client_id=self.identity.client_id, device=device, data=config.data,
                               allowed_tasks=config.allowed_tasks)
        self.rebase = MidRoundRebase(self.overlap, self.replica, self.fetcher, on_read=self._read_snapshot,
                                     follow=config.follow)
        self.codec = get_codec(config.codec)
        self.feedback = ErrorFeedback(self.codec)
        self.speed = SpeedMeter()
        self._last_sent: tuple[str, int] | None = None  # (run id, base version) of the last confirmed delta
        self._received_bytes = 0  # snapshot bytes downloaded since the last round's report
        # the last finished round's timings, which the next delta reports (previous_timings)
        self._previous_timings: dict[str, float] = {}

    @property
    def client_id(self) -> str:
        return self.identity.client_id

    @property
    def trainer(self) -> LocalTrainer | None:
        """The replica's trainer (None until the first snapshot is adopted)."""
        return self.replica.trainer

    def close(self) -> None:
        self.sender.close(self.stop, self.config.upload_grace_s)  # a delta still going out first
        self.redis.close()
        self.identity.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stopping ---------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        return self.limits.should_stop()

    def _train_should_stop(self) -> bool:
        self.sender.keepalive()  # a long round must not let the AMQP connection time out
        return self._should_stop()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundReport], None] | None = None) -> RunSummary:
        """Run rounds until a limit or a stop; call ``on_round`` after each; return a summary.

        A first stop request ends the current round at the next step boundary and still sends
        the steps done (trying for ``upload_grace_s``). Errors in the configuration or from the
        task (:class:`shared.errors.AsyncLocoError`) propagate, and so do permanent mistakes
        (:class:`shared.errors.PermanentError`: refused credentials, an unknown host, nothing
        listening at first contact, no such run, another protocol); service outages never do.
        """
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        self.limits.start()
        rounds, tally = 0, Tally(on_round)
        stopped_by = "stop"
        self.events.started(self.keys.run, self.client_id)
        try:
            self.connect()
        except StopRequested:
            pass  # the loop below sees the stop
        abandoned: RoundAbandoned | None = None  # the round a pause just ended
        while True:
            if self.config.max_rounds and rounds >= self.config.max_rounds:
                stopped_by = "max_rounds"
                break
            self.limits.note_training(0.0)
            if self._should_stop():
                break
            try:
                self.pauses.before_round(abandoned, rounds + 1)
                abandoned = None
                report = self.run_round(rounds + 1)
            except StopRequested:
                break
            except RoundAbandoned as exc:
                self.limits.add_trained(exc.elapsed_s)
                abandoned = exc
                continue
            if report is None:
                break  # stopped before a single step of the round
            rounds += 1
            for done in self.overlap.reports_after(report, self.config.include_wait_s):
                tally.add(done)
        self.sender.finish()
        for done in self.overlap.drain(self.config.include_wait_s):  # the last rounds' verdicts
            tally.add(done)
        stopped_by = self.limits.stopped_by(stopped_by)
        run_id = self.replica.run_id
        next_seq = self.identity.next_seq(run_id) if run_id else None
        return RunSummary(self.client_id, run_id, rounds, tally.sent, next_seq, stopped_by, tally.applied,
                          tally.rejected)

    def connect(self) -> None:
        """The first contact with both servers, before anything is trained: a permanent mistake
        (wrong credentials, an unknown host, nothing listening) raises its
        :class:`~shared.errors.PermanentError` now; an outage is waited out (Redis) or left to
        the first upload (RabbitMQ). Raises :class:`StopRequested` on a stop."""
        self.fetcher.ping()
        self.uploader.connect()

    def run_round(self, number: int = 1) -> RoundReport | None:
        """Run one round and send its delta; None if stopped before any step was taken.

        Raises :class:`StopRequested` if a stop comes while waiting for the coordinator, and
        :class:`RoundAbandoned` if the politeness rules pause it between two training steps.
        The report times each part of the round (fetch, compute, encode, upload, wait); the next
        delta reports them to the coordinator.
        """
        started = time.monotonic()
        self.fetcher.wait_while_another_warms_up(self.client_id, self.config.poll_s, self.on_notice)
        self._wait_for_newer_base()
        fetching = time.monotonic()
        wait_s = fetching - started
        trainer = self._start_from_newest_base()
        base_version, run_id = self.replica.version, self.replica.run_id
        assert base_version is not None and run_id is not None  # set by the base just taken
        plan = self.fetcher.wait_for_plan(self.config.poll_s)
        stacking = self.config.overlap and self.config.include_wait_s > 0 and plan.arrival_share > 0
        stacked_on = -1
        if self.overlap.active:
            self.overlap.learn(run_id=run_id, version=base_version,
                               progress=self.replica.progress)
            if stacking:
                stacked_on = self.overlap.stack(trainer, run_id=run_id, version=base_version,
                                                fresh_base=self._fresh_base)
        fetch_s = time.monotonic() - fetching
        moving = stacked_on >= 0 or (self.config.follow and plan.mode is not RoundMode.SYNC)
        stats, planned = self._train(trainer, number, plan, rebase=moving)
        self.limits.add_trained(stats.compute_s)
        self.limits.note_training(0.0)
        if stats.steps == 0:
            return None
        self.speed.update(stats.steps, stats.compute_s)
        origin_version = -1  # where a round that moved began: the coordinator dates it by that (speed)
        if moving:  # it may have moved onto a newer snapshot
            fetch_s += stats.paused_s
            began = (run_id, base_version)
            base_version, run_id = self.replica.version, self.replica.run_id
            if base_version is None or run_id is None:
                raise BaseLost("its base was lost mid-round (a patch did not apply)", steps=stats.steps,
                               elapsed_s=stats.compute_s)
            stacked_on = self.overlap.stacked_on
            if began[0] == run_id and began[1] != base_version:
                origin_version = began[1]

        encoding = time.monotonic()
        message = self._delta(trainer, stats, run_id, base_version, stacked_on, origin_version)
        encode_s = time.monotonic() - encoding
        self.events.sending(sum(len(blob) for blob in message.tensors.values()))
        upload = self.sender.send(message, run_id=run_id, base_version=base_version, plan=plan,
                                  behind=stacking)
        staleness = None
        fate = DeltaFate()
        waiting = time.monotonic()
        if upload.confirmed and self.config.include_wait_s > 0 and not self._should_stop() and not stacking:
            fate = self.waits.until_included(
                run_id=run_id, seq=message.seq, base_version=base_version,
                within_s=self.config.include_wait_s, sync=plan.mode is RoundMode.SYNC)
            if fate.verdict is not None and not fate.verdict.applied:
                self._last_sent = None  # one delta per base counts applied ones: this base is free again
            self._grace(run_id, fate, plan)
        if upload.confirmed and not self._should_stop():
            # the waits just read it (or the verdict named it: client/inclusion.py)
            current = self.fetcher.current_version(max_age_s=RECENT_VERSION_S)
            staleness = None if current is None else current - base_version
        wait_s += time.monotonic() - waiting
        report = RoundReport(
            round=number, seq=message.seq, base_version=base_version, planned_steps=planned,
            steps=stats.steps, train_loss=stats.train_loss, compute_s=stats.compute_s,
            tokens=stats.tokens, sent_bytes=upload.body_bytes, sent=upload.confirmed,
            upload_s=upload.upload_s, staleness=staleness, fate=fate, run=self.keys.run, run_id=run_id,
            received_bytes=self._take_received_bytes(), fetch_s=fetch_s, encode_s=encode_s, wait_s=wait_s,
        )
        self._previous_timings = report.timings()
        if stacking and upload.confirmed:
            self.overlap.add(InFlight(
                run_id=run_id, seq=message.seq, share=plan.arrival_share * stats.steps / plan.local_steps,
                delta=self._as_sent(message, trainer), report=report))
            self.overlap.wait_for_room(self.config.include_wait_s, poll_s=self.config.poll_s,
                                       on_notice=self.on_notice)
        return report

    def _sent(self, upload: Upload, delta_id: str, seq: int, run_id: str, base_version: int) -> None:
        """How sending a delta went (for one sent behind a round: when that send is finished)."""
        self.overlap.uploaded(run_id, seq, upload)
        if not upload.confirmed:
            log.warning("gave up sending delta %s after the stop grace period", delta_id)
            return
        self._last_sent = (run_id, base_version)
        if self.on_confirmed is not None:
            self.on_confirmed(delta_id)

    # -- pauses and limits ------------------------------------------------------------------------

    def _on_step(self, progress: StepProgress) -> None:
        """Between training steps (about every half second): tell the watcher, count the time
        against max_hours, and abandon the round if the owner's rules say pause or this process
        is over --max-memory."""
        self.events.step(progress)
        self.limits.note_training(progress.elapsed_s)
        reason = self.politeness.pause_reason()
        if reason is not None:
            raise RoundAbandoned(reason, steps=progress.steps, elapsed_s=progress.elapsed_s)
        self.memory.check(steps=progress.steps, elapsed_s=progress.elapsed_s)

    def _read_snapshot(self, version: int, read_bytes: int) -> None:
        self._received_bytes += read_bytes
        self.events.snapshot_read(version, read_bytes)

    def _take_received_bytes(self) -> int:
        received, self._received_bytes = self._received_bytes, 0
        return received

    # -- the parts of a round ---------------------------------------------------------------------

    def _grace(self, run_id: str, fate: DeltaFate, plan: RoundPlan) -> None:
        """With a grace period in ``plan`` (the round's): once our delta is in a snapshot whose outer
        buffer cycle is still open, wait (bounded) for the cycle's momentum step before the next
        round."""
        if fate.version is None or self._should_stop():
            return
        if plan.grace_s <= 0 or plan.mode not in (RoundMode.DYLU, RoundMode.FIXED):
            return
        self.waits.for_cycle_close(run_id=run_id, included=fate.version, grace_s=plan.grace_s)

    def _wait_for_newer_base(self) -> None:
        """Never start a round from the base the last confirmed delta was computed on (unless it is
        stacked on that delta: ``--overlap``); see :meth:`InclusionWait.for_newer_base`."""
        if self._last_sent is None or self.config.include_wait_s == 0 or self.overlap.active:
            return  # include_wait_s 0: no waiting on the coordinator between rounds (see ClientConfig)
        run_id, last_base = self._last_sent
        self.waits.for_newer_base(run_id=run_id, last_base=last_base, poll_s=self.config.poll_s,
                                  on_notice=self.on_notice)

    def _start_from_newest_base(self) -> LocalTrainer:
        """θ ← θ_base of the newest version; download the snapshot only if the replica lacks it."""
        version = self.fetcher.wait_for_version(
            self.config.poll_s,
            on_wait=lambda: self.on_notice(
                f"waiting for the coordinator to publish the first snapshot of run "
                f"{self.keys.run!r} (Ctrl-C to quit)"
            ),
        )
        self._fresh_base = not self.replica.holds(version, self.fetcher.manifest)
        if not self._fresh_base:
            return self.replica.reset()  # every round starts from θ_base of the version it tags
        read_bytes, new_run = self.replica.take_newest(self.fetcher, version)
        assert self.replica.trainer is not None and self.replica.version is not None  # a base now
        self._read_snapshot(self.replica.version, read_bytes)
        if new_run:
            # a model whose deltas this codec cannot fit in the protocol: refused before training
            self.uploader.check_model({n: t.numel() for n, t in self.replica.trainer.base.items()},
                                      self.codec)
            self.feedback.reset()  # a residual of another run's model means nothing here
            self.speed = SpeedMeter()  # nor does a speed measured on another model
            self.on_notice(
                f"joined run {self.keys.run!r} (run id {self.replica.run_id}) at version "
                f"{self.replica.version} as client {self.client_id}: {self.replica.describe()}, "
                f"codec {self.codec.name}"
            )
        return self.replica.trainer

    def _train(self, trainer: LocalTrainer, number: int, plan: RoundPlan, *,
               rebase: bool = False) -> tuple[RoundStats, int]:
        """Size round ``number`` by ``plan`` (DyLU) and run it; return the stats and the planned step
        count. ``rebase``: the round may move onto a newer snapshot mid-way (client/overlap.py)."""
        global_step = int(self.replica.progress.get("local_steps", 0))
        common: dict[str, Any] = dict(
            global_step=global_step, slowdown=self.config.slowdown, should_stop=self._train_should_stop,
            on_step=self._on_step, between_steps=self.rebase.between_steps if rebase else None,
        )
        # The coordinator's assignment for this client (DyLU), else H (warm start, fixed, sync).
        steps, min_steps, time_budget_s = round_length(plan, self.client_id, self.speed.steps_per_s)
        assert self.replica.version is not None and self.replica.run_id is not None
        self.events.round_started(RoundStart(
            round=number, run=self.keys.run, run_id=self.replica.run_id, client_id=self.client_id,
            base_version=self.replica.version, planned_steps=steps))
        stats = trainer.train(steps, min_steps=min_steps, time_budget_s=time_budget_s, **common)
        log.debug("round: planned %d steps, ran %d in %.2fs", steps, stats.steps, stats.compute_s)
        return stats, steps

    def _delta(
        self, trainer: LocalTrainer, stats: RoundStats, run_id: str, base_version: int, stacked_on: int,
        origin_version: int = -1,
    ) -> DeltaMessage:
        """Compress g = θ_base − θ with error feedback and tag it with a freshly reserved seq."""
        # taken and quantised where the model is: from a GPU only the encoded bytes come back
        gradient = trainer.pseudo_gradient(on_device=True)
        tensors = {name: self.feedback.encode(name, g) for name, g in gradient.items()}
        self.uploader.check_payload(tensors, self.codec.name)  # before a number is spent on it
        seq = self.identity.reserve_seq(run_id)  # durable before the publish: never reused
        return DeltaMessage(
            run_id=run_id, client_id=self.client_id, seq=seq, base_version=base_version,
            local_steps=stats.steps, samples=stats.samples, tokens=stats.tokens,
            compute_s=stats.compute_s, train_loss=stats.train_loss, codec=self.codec.name,
            tensors=tensors, sent_at=time.time(), device=describe_device(trainer.device),
            previous_timings=self._previous_timings, stacked_on=stacked_on, origin_version=origin_version,
        )

    def _as_sent(self, message: DeltaMessage, trainer: LocalTrainer) -> dict[str, torch.Tensor]:
        """The delta as the coordinator will decode it (the codec's rounding included), on the CPU."""
        return {name: self.codec.decode(blob, trainer.base[name].numel())
                for name, blob in message.tensors.items()}

