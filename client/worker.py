"""The client's round loop: fetch the newest snapshot, train a round sized to this machine, send g.

One round::

    v = current version          (a small GET; the snapshot itself only when v changed)
    θ ← θ_base(v)                (load_base on a new version, else reset_to_base)
    H_i from the plan and this machine's measured speed (Dynamic Local Updates)
    train H_i inner steps        (AdamW state kept across rounds, rebuilt only for a new run)
    g = θ_base − θ               compressed with error feedback, tagged (run_id, client_id, seq, v)
    publish with confirms        (retrying the same bytes and seq until the broker confirms)

The worker knows nothing of the terminal: it reports each round as a :class:`RoundReport` through
a callback, and notices ("waiting for the first snapshot") through another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from client.config import ClientConfig
from client.fetcher import SnapshotFetcher
from client.identity import ClientIdentity
from client.stop import StopRequested
from client.uploader import DeltaUploader
from shared.codecs import ErrorFeedback, get_codec
from shared.dylu import SpeedMeter, local_steps_for, round_time_budget_s
from shared.errors import ConfigError, SnapshotError
from shared.keys import RunKeys
from shared.local_round import InnerConfig, LocalTrainer, RoundStats, pick_device
from shared.protocol import DEFAULT_DELTA_LIMITS, PART_TYPE, DeltaMessage, MiB, split_delta
from shared.settings import sleep_interruptibly
from shared.snapshot import Snapshot
from shared.tasks import load_task

log = logging.getLogger(__name__)

ENVELOPE_BYTES = 4096  # msgpack fields around the tensor payloads, with room to spare


@dataclass(frozen=True)
class RoundReport:
    """What one finished round did; ``line()`` is the progress line the CLI prints."""

    round: int  # 1-based count of rounds this process ran
    seq: int
    base_version: int
    planned_steps: int  # H_i this round aimed for
    steps: int  # steps actually run (fewer if stopped or out of time budget)
    train_loss: float
    compute_s: float
    tokens: int
    sent_bytes: int
    sent: bool  # False only if a stopping client gave up on the upload
    upload_s: float
    staleness: int | None  # current version just after the publish minus base_version

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s > 0 else 0.0

    def line(self) -> str:
        stale = "?" if self.staleness is None else str(self.staleness)
        sent = f"{self.sent_bytes / 1e6:.1f}MB" if self.sent else "NOT-SENT"
        return (
            f"round {self.round}  v={self.base_version}  H={self.steps}  loss={self.train_loss:.3f}  "
            f"tok/s={self.tokens_per_s:.0f}  sent={sent}  staleness={stale}"
        )


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`Worker.run` did in total, and why it stopped."""

    client_id: str
    run_id: str | None
    rounds: int
    deltas_sent: int
    next_seq: int | None
    stopped_by: str  # "max_rounds", "max_seconds" or "stop"

    def line(self) -> str:
        return (
            f"stopped ({self.stopped_by}): {self.rounds} rounds, {self.deltas_sent} deltas sent "
            f"as client {self.client_id}"
            + (f", next seq {self.next_seq}" if self.next_seq is not None else "")
        )


class Worker:
    """Runs local rounds for one run until ``max_rounds``, ``max_seconds`` or ``stop`` says enough.

    ``stop`` is the event the CLI's signal handlers set; set it from another thread to stop an
    in-process worker. Use as a context manager (or call :meth:`close`) to release connections
    and the client-id slot.
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        stop: threading.Event | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.on_notice = on_notice or (lambda text: log.info("%s", text))
        self.keys = RunKeys(config.run)
        self.device = pick_device(config.device)
        self.identity = ClientIdentity.open(config.state_dir, config.client_id)
        self.fetcher = SnapshotFetcher(
            config.connection, self.keys, retry=config.retry, should_stop=self._should_stop
        )
        self.uploader = DeltaUploader(config.connection, self.keys.delta_queue, retry=config.retry)
        self.codec = get_codec(config.codec)
        self.feedback = ErrorFeedback(self.codec)
        self.speed = SpeedMeter()
        self.trainer: LocalTrainer | None = None
        self._run_key: tuple[str, str] | None = None  # (run_id, config JSON) the trainer was built for
        self.snapshot_version: int | None = None  # version θ_base comes from
        self._base_stamp: tuple[str, float] | None = None  # (run_id, created_at) of that snapshot
        self.run_id: str | None = None
        self.progress: dict[str, Any] = {}
        self._deadline: float | None = None  # time.monotonic() when max_seconds is up
        self._stop_seen: float | None = None  # when a stop or the deadline was first noticed

    @property
    def client_id(self) -> str:
        return self.identity.client_id

    def close(self) -> None:
        self.uploader.close()
        self.fetcher.close()
        self.identity.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stopping ---------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        """True once a stop was asked for or max_seconds is up (checked between training steps)."""
        past = self._deadline is not None and time.monotonic() >= self._deadline
        if (self.stop.is_set() or past) and self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return self._stop_seen is not None

    def _give_up_upload(self) -> bool:
        """A stopping client tries to send its last delta for ``upload_grace_s``, then gives up."""
        if not self._should_stop() or self._stop_seen is None:
            return False
        return time.monotonic() - self._stop_seen > self.config.upload_grace_s

    def _train_should_stop(self) -> bool:
        self.uploader.keepalive()  # a long round must not let the AMQP connection time out
        return self._should_stop()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundReport], None] | None = None) -> RunSummary:
        """Run rounds until a limit or a stop; call ``on_round`` after each; return a summary.

        A first stop request ends the current round at the next step boundary and still sends
        the steps done (trying for ``upload_grace_s``). Errors in the configuration or from the
        task (:class:`shared.errors.AsyncLocoError`) propagate; service outages never do.
        """
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        if self.config.max_seconds > 0:
            self._deadline = time.monotonic() + self.config.max_seconds
        rounds = sent = 0
        stopped_by = "stop"
        while True:
            if self.config.max_rounds and rounds >= self.config.max_rounds:
                stopped_by = "max_rounds"
                break
            if self._should_stop():
                break
            try:
                report = self.run_round(rounds + 1)
            except StopRequested:
                break
            if report is None:
                break  # stopped before a single step of the round
            rounds += 1
            sent += int(report.sent)
            if on_round is not None:
                on_round(report)
        if self._deadline is not None and not self.stop.is_set() and stopped_by == "stop":
            stopped_by = "max_seconds"
        next_seq = self.identity.next_seq(self.run_id) if self.run_id else None
        return RunSummary(self.client_id, self.run_id, rounds, sent, next_seq, stopped_by)

    def run_round(self, number: int = 1) -> RoundReport | None:
        """Run one round and send its delta; None if stopped before any step was taken.

        Raises :class:`StopRequested` if a stop comes while waiting for the coordinator.
        """
        self._wait_while_another_warms_up()
        version = self.fetcher.wait_for_version(
            self.config.poll_s,
            on_wait=lambda: self.on_notice(
                f"waiting for the coordinator to publish the first snapshot of run "
                f"{self.keys.run!r} (Ctrl-C to quit)"
            ),
        )
        if not self._holds(version):
            self._adopt(self.fetcher.read_latest())
        else:
            self.trainer.reset_to_base()  # every round starts from θ_base of the version it tags
        assert self.trainer is not None and self.run_id is not None and self.snapshot_version is not None
        base_version = self.snapshot_version
        stats, planned = self._train(self.trainer)
        if stats.steps == 0:
            return None
        self.speed.update(stats.steps, stats.compute_s)

        body, seq = self._encode(stats, base_version)
        started = time.monotonic()
        ok = self._send(body, seq)
        upload_s = time.monotonic() - started
        if not ok:
            log.warning("gave up sending delta %s:%s after the stop grace period", self.client_id, seq)
        elif self.config.journal is not None:
            self._journal(f"{self.client_id}:{seq}")
        staleness = None
        if ok and self.config.include_wait_s > 0 and not self._should_stop():
            self._wait_until_included(seq, base_version)
        if ok and not self._should_stop():
            current = self.fetcher.current_version()
            staleness = None if current is None else current - base_version
        return RoundReport(
            round=number, seq=seq, base_version=base_version, planned_steps=planned,
            steps=stats.steps, train_loss=stats.train_loss, compute_s=stats.compute_s,
            tokens=stats.tokens, sent_bytes=len(body), sent=ok, upload_s=upload_s, staleness=staleness,
        )

    # -- the parts of a round ---------------------------------------------------------------------

    def _journal(self, delta_id: str) -> None:
        """Record a confirmed delta id in the journal file, durably, before the next round."""
        assert self.config.journal is not None
        with open(self.config.journal, "a", encoding="utf-8") as fh:
            fh.write(delta_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _wait_while_another_warms_up(self) -> None:
        """Warm start: while the plan names another client to train alone, wait instead of training
        rounds the coordinator would refuse. Raises :class:`StopRequested` on a stop."""
        noticed = False
        while True:
            plan = self.fetcher.plan()
            if plan is None or not plan.warm_start or plan.warm_client in ("", self.client_id):
                return
            if not noticed:
                self.on_notice(f"warm start: client {plan.warm_client} trains the run's first steps "
                               "alone; this client joins when it is done")
                noticed = True
            if sleep_interruptibly(self.config.poll_s, self._should_stop):
                raise StopRequested()

    def _wait_until_included(self, seq: int, base_version: int) -> bool:
        """Wait (bounded by ``include_wait_s``) until a published snapshot includes delta ``seq``.

        The coordinator lists each active client's newest applied seq in the manifest's progress.
        Starting the next round from a base without our own last delta would make the next delta
        repeat most of it, and Delayed Nesterov would count that work twice.
        """
        plan = self.fetcher.plan()
        # A synchronous round completes only when the slowest client has sent: wait for the next
        # version however long that takes (it follows the round whether or not ours made it).
        sync = plan is not None and plan.sync
        deadline = time.monotonic() + (math.inf if sync else self.config.include_wait_s)
        while time.monotonic() < deadline and not self._should_stop():
            version = self.fetcher.current_version()
            if sync and version is not None and version > base_version:
                return True
            if version is not None and version > base_version:
                try:
                    manifest = self.fetcher.manifest(version)
                except SnapshotError:
                    manifest = None
                if manifest is not None and manifest.run_id != self.run_id:
                    return False  # a new run: the next round adopts it
                seqs = manifest.progress.get("client_seqs", {}) if manifest is not None else {}
                if isinstance(seqs, dict) and int(seqs.get(self.client_id, -1)) >= seq:
                    return True
            time.sleep(0.05)
        log.info("delta %s:%d not yet in a snapshot after %.0f s; going on", self.client_id, seq,
                 self.config.include_wait_s)
        return False

    def _holds(self, version: int) -> bool:
        """True if θ_base is already snapshot ``version`` of the same run.

        The version number alone is not enough: a coordinator started afresh under the same run
        name publishes its own version 0 again (one small GET of the manifest tells them apart).
        """
        if self.trainer is None or version != self.snapshot_version:
            return False
        try:
            manifest = self.fetcher.manifest(version)
        except SnapshotError:
            return False  # expired or replaced: read whatever is current now
        return (manifest.run_id, manifest.created_at) == self._base_stamp

    def _adopt(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` θ_base; build a fresh trainer first if it belongs to a new run."""
        manifest = snapshot.manifest
        run_config = manifest.config
        for key in ("task", "task_settings", "inner", "seed"):
            if key not in run_config:
                raise ConfigError(f"snapshot {manifest.version} has no {key!r} in its run config")
        run_key = (manifest.run_id, json.dumps(run_config, sort_keys=True, default=str))
        if run_key != self._run_key:
            self.trainer = self._build_trainer(run_config)
            self._run_key = run_key
            self.feedback.reset()  # a residual of another run's model means nothing here
            self.speed = SpeedMeter()
            self.on_notice(
                f"joined run {self.keys.run!r} (run id {manifest.run_id}) at version {manifest.version} "
                f"as client {self.client_id}: {self._describe(self.trainer)}"
            )
        assert self.trainer is not None
        self.trainer.load_base(snapshot.params)
        self.snapshot_version = manifest.version
        self._base_stamp = (manifest.run_id, manifest.created_at)
        self.run_id = manifest.run_id
        self.progress = dict(manifest.progress)

    def _build_trainer(self, run_config: dict[str, Any]) -> LocalTrainer:
        settings = dict(run_config["task_settings"])
        if self.config.data is not None:
            if "data" in settings:
                settings["data"] = self.config.data
            else:
                log.warning("task %r has no 'data' setting; --data is ignored", run_config["task"])
        task = load_task(str(run_config["task"]), settings)
        if not isinstance(run_config["inner"], dict):
            raise ConfigError("the run config's 'inner' is not a map")
        try:
            inner = InnerConfig(**run_config["inner"])
        except TypeError as exc:
            raise ConfigError(f"the run's inner optimizer settings do not fit this client: {exc}") from exc
        # crc32, not hash(): the same client id must pick the same shard in every process.
        crc = zlib.crc32(self.client_id.encode())
        return LocalTrainer(
            task=task, inner=inner, device=self.device,
            shard=crc % task.num_shards, seed=crc ^ int(run_config["seed"]),
        )

    def _describe(self, trainer: LocalTrainer) -> str:
        params = sum(p.numel() for p in trainer.model.parameters())
        shard = zlib.crc32(self.client_id.encode()) % trainer.task.num_shards
        return f"{params / 1e6:.2f}M params on {self.device}, data shard {shard}, codec {self.codec.name}"

    def _train(self, trainer: LocalTrainer) -> tuple[RoundStats, int]:
        """Size the round (DyLU) and run it; return the stats and the planned step count."""
        plan = self.fetcher.wait_for_plan(self.config.poll_s)
        global_step = int(self.progress.get("local_steps", 0))
        common: dict[str, Any] = dict(
            global_step=global_step, slowdown=self.config.slowdown, should_stop=self._train_should_stop
        )
        if plan.warm_start:  # ordinary training in rounds of H while the run warms up
            steps = plan.local_steps
            stats = trainer.train(steps, min_steps=steps, **common)
        elif self.speed.steps_per_s is not None:
            steps = local_steps_for(plan, self.speed.steps_per_s)
            stats = trainer.train(steps, min_steps=steps, **common)
        else:
            # First round: speed unknown, so a slow machine stops at the round's time budget.
            steps = plan.local_steps
            stats = trainer.train(
                steps, min_steps=plan.min_local_steps, time_budget_s=round_time_budget_s(plan), **common
            )
        log.debug("round: planned %d steps, ran %d in %.2fs", steps, stats.steps, stats.compute_s)
        return stats, steps

    def _send(self, body: bytes, seq: int) -> bool:
        """Publish a delta, as one message or, if bigger than ``part_bytes``, as parts in order.

        True once the broker confirmed all of it; False if the stop grace period ran out first (a
        delta left in part is discarded by the coordinator after its part timeout).
        """
        message_id = f"{self.client_id}:{seq}"
        if len(body) <= self.config.part_bytes:
            return self.uploader.publish(body, message_id=message_id, give_up=self._give_up_upload)
        assert self.run_id is not None
        parts = split_delta(body, part_bytes=self.config.part_bytes, run_id=self.run_id,
                            client_id=self.client_id, seq=seq)
        log.info("delta %s is %.1f MiB: sending it in %d parts", message_id, len(body) / MiB, len(parts))
        return all(
            self.uploader.publish(part.encode(), message_id=f"{message_id}/{part.index}",
                                  message_type=PART_TYPE, give_up=self._give_up_upload)
            for part in parts
        )

    def _encode(self, stats: RoundStats, base_version: int) -> tuple[bytes, int]:
        """Compress g with error feedback, reserve a sequence number, and encode the delta message."""
        assert self.trainer is not None and self.run_id is not None
        gradient = self.trainer.pseudo_gradient()
        tensors = {name: self.feedback.encode(name, g) for name, g in gradient.items()}
        limit = DEFAULT_DELTA_LIMITS.max_delta_bytes
        payload = sum(len(blob) for blob in tensors.values())
        if payload + ENVELOPE_BYTES > limit:
            raise ConfigError(
                f"a delta of this model is {payload / MiB:.1f} MiB with codec {self.codec.name}, over the "
                f"{limit // MiB} MiB limit of a delta; use --codec int8"
            )
        seq = self.identity.reserve_seq(self.run_id)  # durable before the publish: never reused
        message = DeltaMessage(
            run_id=self.run_id, client_id=self.client_id, seq=seq, base_version=base_version,
            local_steps=stats.steps, samples=stats.samples, tokens=stats.tokens,
            compute_s=stats.compute_s, train_loss=stats.train_loss, codec=self.codec.name,
            tensors=tensors, sent_at=time.time(),
        )
        body = message.encode()
        if len(body) > limit:
            raise ConfigError(
                f"delta message is {len(body) / MiB:.1f} MiB, over the {limit // MiB} MiB limit of a delta; "
                "use --codec int8"
            )
        return body, seq
