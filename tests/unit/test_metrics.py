"""The coordinator's Prometheus metrics without servers: what a scrape shows of a run, which events
the histograms count, a registry per coordinator, and a port that cannot be had."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.config import MetricsConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.outcome import Outcome, OutcomeKind
from coordinator.run_state import RunState
from shared.errors import ConfigError
from tests.services import small_config


def samples(metrics: CoordinatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def run(tmp_path: Path) -> RunState:
    return RunState.open(small_config("m", tmp_path), None, None)


@pytest.fixture
def metrics(run: RunState) -> Iterator[CoordinatorMetrics]:
    m = CoordinatorMetrics(MetricsConfig(), run=lambda: run, consumer=lambda: None)
    yield m
    m.stop()


def test_a_scrape_shows_the_runs_own_counts(run: RunState, metrics: CoordinatorMetrics) -> None:
    run.intake.count(Outcome.rejected("stale", "old base", "c1", 0))
    run.intake.count(Outcome.rejected("stale", "old base", "c1", 1))
    run.intake.count(Outcome.rejected("undecodable", "noise"))
    run.intake.count(Outcome(OutcomeKind.DUPLICATE, "duplicate", "", "c1", 0))
    run.version, run.commits = 5, 2
    run.evaluate()
    got = samples(metrics)
    assert got[("asyncloco_deltas_total", (("outcome", "rejected"),))] == 3
    assert got[("asyncloco_deltas_total", (("outcome", "duplicate"),))] == 1
    assert got[("asyncloco_deltas_total", (("outcome", "applied"),))] == 0
    assert got[("asyncloco_deltas_rejected_total", (("reason", "stale"),))] == 2
    assert got[("asyncloco_deltas_rejected_total", (("reason", "undecodable"),))] == 1
    assert got[("asyncloco_version", ())] == 5 and got[("asyncloco_commits_total", ())] == 2
    assert got[("asyncloco_eval_loss", ())] == pytest.approx(run.latest_eval)
    assert got[("asyncloco_eval_version", ())] == 5
    assert got[("asyncloco_run_info", (("run", "m"), ("run_id", run.run_id), ("strategy", "edn")))] == 1
    # no consumer yet: no queue depth rather than a made-up 0
    assert not any(name == "asyncloco_delta_queue_depth" for name, _ in got)


def test_histograms_count_applied_deltas_commits_and_publishes(metrics: CoordinatorMetrics) -> None:
    metrics.delta_handled(Outcome(OutcomeKind.APPLIED, client_id="c1", seq=0, staleness=3), 0.02)
    metrics.delta_handled(Outcome(OutcomeKind.APPLIED, client_id="c2", seq=0, staleness=0), 0.01)
    metrics.delta_handled(Outcome.rejected("stale", "old", "c3", 0, staleness=40), 0.001)  # not applied
    metrics.committed(0.2)
    metrics.published(9, 0.05)
    got = samples(metrics)
    assert got[("asyncloco_delta_staleness_updates_count", ())] == 2
    assert got[("asyncloco_delta_staleness_updates_sum", ())] == 3
    assert got[("asyncloco_delta_staleness_updates_bucket", (("le", "2.0"),))] == 1
    assert got[("asyncloco_delta_apply_seconds_sum", ())] == pytest.approx(0.03)
    assert got[("asyncloco_commit_seconds_count", ())] == 1
    assert got[("asyncloco_snapshot_publish_seconds_count", ())] == 1
    assert got[("asyncloco_snapshot_published_version", ())] == 9


def test_each_coordinator_has_its_own_registry(run: RunState) -> None:
    a = CoordinatorMetrics(MetricsConfig(), run=lambda: run, consumer=lambda: None)
    b = CoordinatorMetrics(MetricsConfig(), run=lambda: None, consumer=lambda: None)
    a.committed(1.0)
    assert samples(a)[("asyncloco_commit_seconds_count", ())] == 1
    assert samples(b)[("asyncloco_commit_seconds_count", ())] == 0
    assert not any(name == "asyncloco_version" for name, _ in samples(b))  # not set up: no run figures


def test_no_port_serves_nothing(metrics: CoordinatorMetrics) -> None:
    metrics.start()
    assert metrics.address is None


def test_a_port_already_taken_is_one_clear_error(run: RunState) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = CoordinatorMetrics(MetricsConfig(port=port), run=lambda: run, consumer=lambda: None)
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.start()
    assert metrics.address is None


@pytest.mark.parametrize(("port", "host"), [(-1, "127.0.0.1"), (65536, "127.0.0.1"), (9100, "")])
def test_metrics_config_refuses_bad_values(port: int, host: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-"):
        MetricsConfig(port=port, host=host)
