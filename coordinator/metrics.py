"""Prometheus metrics of one coordinator, served on ``/metrics`` (``serve --metrics-port``).

Two kinds of figures, in one :class:`~prometheus_client.CollectorRegistry` per coordinator (so
that coordinators serving in threads of one process, as the tests run them, never share one):

* what the run *is*, read from :class:`~coordinator.run_state.RunState` when Prometheus scrapes:
  version, deltas by outcome and by rejection reason, progress, eval loss, queue depth, each
  volunteer's applied deltas and steps. These are the run's own totals, the very numbers
  ``status`` shows (docs/STATUS.md); they survive a ``--resume`` and restart only with a new run.
* what *happens*, observed as it happens: the staleness and apply time of each applied delta, the
  time of each commit and of each snapshot publish (histograms; they count from this process's
  start, as Prometheus expects of a process).

The run's figures are read from the HTTP server's thread while the coordinator's loop changes
them: only plain attribute reads and whole-dict copies (``dict(...)``, ``list(d.values())``),
which CPython does atomically, so a scrape never sees a dict change size under it.

Names (all prefixed ``asyncloco_``): ``run_info``, ``version``, ``snapshot_published_version``,
``commits_total``, ``deltas_total{outcome}``, ``deltas_rejected_total{reason}``,
``delta_queue_depth``, ``dead_letter_queue_depth``, ``local_steps_total``, ``tokens_total``,
``samples_total``, ``eval_loss``, ``eval_version``, ``volunteer_deltas_applied_total{client}``,
``volunteer_deltas_rejected_total{client}``, ``volunteer_local_steps_total{client}``,
``volunteer_tokens_total{client}``, ``volunteer_steps_per_second{client}``,
``volunteer_last_seen_timestamp_seconds{client}``, and the histograms
``delta_staleness_updates``, ``delta_apply_seconds``, ``commit_seconds``,
``snapshot_publish_seconds``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.config import MetricsConfig
from coordinator.consumer import DeltaConsumer
from coordinator.http_serving import stop_server
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.run_state import RunState
from shared.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

PREFIX = "asyncloco_"
# Deltas applied since the base; the automatic --max-staleness is 8 per active client (at least 32).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
# Seconds: from a tiny model's milliseconds to a big model's checkpoint and upload.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _RunCollector(Collector):
    """The run's figures, read from its state at each scrape (see the module docstring)."""

    def __init__(self, run: Callable[[], RunState | None],
                 consumer: Callable[[], DeltaConsumer | None]) -> None:
        self.run = run
        self.consumer = consumer

    def collect(self) -> Iterator[Metric]:
        run = self.run()
        if run is None:  # not set up yet: only the histograms, empty
            return
        info = GaugeMetricFamily(PREFIX + "run_info", "The run served: always 1.",
                                 labels=["run", "run_id", "strategy"])
        info.add_metric([run.config.run, run.run_id, run.config.outer.strategy], 1)
        yield info
        yield GaugeMetricFamily(PREFIX + "version", "The newest committed model version.", value=run.version)
        yield CounterMetricFamily(PREFIX + "commits", "Commits of the run.", value=run.commits)
        counts = dict(run.intake.counts)
        outcomes = CounterMetricFamily(PREFIX + "deltas", "Deltas handled, by outcome (as status counts).",
                                       labels=["outcome"])
        for kind in (OutcomeKind.APPLIED, OutcomeKind.DUPLICATE, OutcomeKind.REJECTED):
            outcomes.add_metric([kind.value], counts.get(kind.value, 0))
        yield outcomes
        reasons = CounterMetricFamily(PREFIX + "deltas_rejected", "Deltas rejected, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(dict(run.intake.rejected_by_reason).items()):
            reasons.add_metric([reason], count)
        yield reasons
        guard = CounterMetricFamily(PREFIX + "guard_decisions", "The guard's decisions on deltas (judged, "
                                    "accepted, clipped, and each refusal reason).", labels=["decision"])
        for decision, count in sorted(dict(run.guard.counts).items()):
            guard.add_metric([decision], count)
        yield guard
        progress = run.progress
        yield CounterMetricFamily(PREFIX + "local_steps", "Local steps credited to applied deltas.",
                                  value=progress.local_steps)
        yield CounterMetricFamily(PREFIX + "tokens", "Tokens credited to applied deltas.",
                                  value=progress.tokens)
        yield CounterMetricFamily(PREFIX + "samples", "Samples credited to applied deltas.",
                                  value=progress.samples)
        history = run.eval_history
        if history:
            version, _, loss = history[-1]
            yield GaugeMetricFamily(PREFIX + "eval_loss", "Eval loss of the newest evaluated version.",
                                    value=loss)
            yield GaugeMetricFamily(PREFIX + "eval_version", "The version the eval loss is of.",
                                    value=version)
        yield from self._queue()
        yield from self._volunteers(run)

    def _queue(self) -> Iterator[Metric]:
        consumer = self.consumer()
        # None until the consumer has asked the broker: no sample rather than a made-up 0.
        depth = consumer.queue_depth if consumer is not None else None
        dead = consumer.dead_letters if consumer is not None else None
        if depth is not None:
            yield GaugeMetricFamily(PREFIX + "delta_queue_depth",
                                    "Deltas waiting in the queue (not counting those delivered, unacked).",
                                    value=depth)
        if dead is not None:
            yield GaugeMetricFamily(PREFIX + "dead_letter_queue_depth",
                                    "Rejected deltas kept as dead letters.", value=dead)

    def _volunteers(self, run: RunState) -> Iterator[Metric]:
        records = sorted(list(run.registry.clients.values()), key=lambda c: c.client_id)
        label = ["client"]
        applied = CounterMetricFamily(PREFIX + "volunteer_deltas_applied",
                                      "Applied deltas of each volunteer.", labels=label)
        rejected = CounterMetricFamily(PREFIX + "volunteer_deltas_rejected",
                                       "Rejected deltas of each volunteer.", labels=label)
        steps = CounterMetricFamily(PREFIX + "volunteer_local_steps",
                                    "Local steps credited to each volunteer.", labels=label)
        tokens = CounterMetricFamily(PREFIX + "volunteer_tokens", "Tokens credited to each volunteer.",
                                     labels=label)
        speed = GaugeMetricFamily(PREFIX + "volunteer_steps_per_second",
                                  "Each volunteer's speed as the coordinator measures it (0: not yet).",
                                  labels=label)
        seen = GaugeMetricFamily(PREFIX + "volunteer_last_seen_timestamp_seconds",
                                 "Unix time of each volunteer's newest applied delta.", labels=label)
        for c in records:
            applied.add_metric([c.client_id], c.updates)
            rejected.add_metric([c.client_id], c.rejected)
            steps.add_metric([c.client_id], c.local_steps)
            tokens.add_metric([c.client_id], c.tokens)
            speed.add_metric([c.client_id], c.steps_per_s)
            seen.add_metric([c.client_id], c.last_seen)
        yield from (applied, rejected, steps, tokens, speed, seen)


class CoordinatorMetrics:
    """One coordinator's metrics and, when ``config.port`` is set, the HTTP server of ``/metrics``.

    ``run`` and ``consumer`` return the coordinator's run state and consumer (None before they
    exist); the coordinator calls :meth:`delta_handled`, :meth:`committed` and :meth:`published`
    as those happen. If ``histogram_quantile`` of ``commit_seconds`` grows, raise
    ``--commit-every`` / ``--commit-interval`` (fewer, bigger commits).
    """

    def __init__(self, config: MetricsConfig, *, run: Callable[[], RunState | None],
                 consumer: Callable[[], DeltaConsumer | None]) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.staleness = Histogram(PREFIX + "delta_staleness_updates",
                                   "Staleness of applied deltas: deltas applied since their base version.",
                                   buckets=STALENESS_BUCKETS, registry=self.registry)
        self.apply_seconds = Histogram(PREFIX + "delta_apply_seconds",
                                       "Seconds the intake took over an applied delta: decode, checks, step.",
                                       buckets=TIME_BUCKETS, registry=self.registry)
        self.commit_seconds = Histogram(PREFIX + "commit_seconds",
                                        "Seconds of one commit: applied log, checkpoint, acks, publish.",
                                        buckets=TIME_BUCKETS, registry=self.registry)
        self.publish_seconds = Histogram(PREFIX + "snapshot_publish_seconds",
                                         "Seconds to publish one snapshot and its plan to Redis.",
                                         buckets=TIME_BUCKETS, registry=self.registry)
        self.published_version = Gauge(PREFIX + "snapshot_published_version",
                                       "The newest version published to Redis (-1: none yet).",
                                       registry=self.registry)
        self.published_version.set(-1)
        self.registry.register(_RunCollector(run, consumer))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- what happens
    def delta_handled(self, outcome: Outcome, seconds: float) -> None:
        """A whole delta went through the intake in ``seconds``; only applied ones are observed."""
        if outcome.kind is OutcomeKind.APPLIED:
            self.staleness.observe(outcome.staleness)
            self.apply_seconds.observe(seconds)

    def committed(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def published(self, version: int, seconds: float) -> None:
        self.publish_seconds.observe(seconds)
        self.published_version.set(version)

    # ---------------------------------------------------------------- the HTTP server
    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) that ``/metrics`` is served on; None when not served."""
        if self._server is None:
            return None
        return self.config.host, int(self._server.server_port)

    def start(self) -> None:
        """Serve ``/metrics`` in a daemon thread, if a port is configured; a port that cannot be
        had is a :class:`ConfigError`, raised before the coordinator changes anything."""
        if not self.config.port or self._server is not None:
            return
        host, port = self.config.host, self.config.port
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                              "pick another --metrics-port or --metrics-host") from exc
        log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        stop_server(self._server, self._thread)
        self._server = self._thread = None
