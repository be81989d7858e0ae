"""The client side of "one delta per client per base version": a worker never starts a round from
the base its last confirmed delta was computed on; it waits for a newer version (or another run),
saying so once, until a stop. A stand-in fetcher plays Redis (a pure unit test)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from client.inclusion import InclusionWait
from client.overlap import Overlap
from client.stop import RunLimits, StopRequested
from client.worker import Worker


@dataclass
class Versions:
    """What ``current_version`` returns, call by call (the last one repeats), and each version's run."""

    sequence: list[int | None]
    runs: dict[int, str] = field(default_factory=dict)
    calls: int = 0
    should_stop: Callable[[], bool] = lambda: False

    def current_version(self) -> int | None:
        value = self.sequence[min(self.calls, len(self.sequence) - 1)]
        self.calls += 1
        return value

    def manifest_if_readable(self, version: int) -> SimpleNamespace | None:
        if version not in self.runs:
            return None  # gone or not there yet
        return SimpleNamespace(run_id=self.runs[version])


def worker(versions: Versions,
           last_sent: tuple[str, int] | None) -> tuple[Worker, list[str], threading.Event]:
    notices: list[str] = []
    stop = threading.Event()
    w = Worker.__new__(Worker)  # no servers: only what the wait uses
    w.fetcher = versions  # type: ignore[assignment]
    versions.should_stop = stop.is_set  # the fetcher's stop, as the waits see it
    w.waits = InclusionWait(versions, "me")  # type: ignore[arg-type]
    w.overlap = Overlap(w.waits)
    w.config = SimpleNamespace(poll_s=0.001, include_wait_s=10.0)  # type: ignore[assignment]
    w.on_notice = notices.append
    w.stop = stop
    w.limits = RunLimits(stop)
    w._last_sent = last_sent
    return w, notices, stop


def test_a_worker_waits_for_a_version_newer_than_its_last_base_and_says_so_once() -> None:
    versions = Versions([7, 7, 7, None, 7, 8], runs={7: "run-a"})
    w, notices, _ = worker(versions, ("run-a", 7))
    w._wait_for_newer_base()
    assert versions.calls == 6
    assert notices == ["waiting for a version newer than 7: the coordinator takes one delta per client "
                       "per version (Ctrl-C to quit)"]


def test_no_wait_before_the_first_delta_or_once_the_version_moved() -> None:
    for last_sent in (None, ("run-a", 6)):
        versions = Versions([7], runs={7: "run-a"})
        w, notices, _ = worker(versions, last_sent)
        w._wait_for_newer_base()
        assert notices == [] and versions.calls == (0 if last_sent is None else 1)


def test_a_new_run_counting_from_zero_again_ends_the_wait() -> None:
    versions = Versions([0], runs={0: "run-b"})
    w, notices, _ = worker(versions, ("run-a", 7))
    w._wait_for_newer_base()
    assert notices == []


def test_only_a_stop_ends_a_wait_for_a_version_that_never_comes() -> None:
    versions = Versions([7], runs={7: "run-a"})
    w, notices, stop = worker(versions, ("run-a", 7))
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(StopRequested):
        w._wait_for_newer_base()
    assert versions.calls > 10 and len(notices) == 1


def test_include_wait_zero_never_waits() -> None:
    """``--include-wait 0``: no waiting on the coordinator between rounds (the round may then be
    refused already_sent); the fault tests use it to pile deltas up."""
    versions = Versions([3])
    w, notices, _ = worker(versions, ("run-a", 3))
    w.config = SimpleNamespace(poll_s=0.001, include_wait_s=0.0)  # type: ignore[assignment]
    w._wait_for_newer_base()
    assert versions.calls == 0 and notices == []
