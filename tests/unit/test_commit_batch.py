"""When a commit is due: the three rules of CommitConfig, spaced by what commits cost."""

from __future__ import annotations

import pytest

import coordinator.commit_batch as commit_batch
from coordinator.commit_batch import CommitBatch, CommitConfig
from coordinator.consumer import Delivery
from coordinator.outcome import Outcome
from shared.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(commit_batch.time, "monotonic", clock)
    return clock


def _add(batch: CommitBatch, count: int = 1) -> None:
    for seq in range(count):
        batch.add(Delivery.from_spool(""), Outcome.rejected("stale", "", "c", seq))


def test_a_cheap_commit_leaves_the_three_rules_as_they_are(clock: Clock) -> None:
    batch = CommitBatch(CommitConfig(every_updates=4, interval_s=2.0, idle_interval_s=0.25))
    batch.committed(0.01)  # a small model: 10 ms
    _add(batch)
    assert not batch.due(inbox_empty=True)
    clock.now += 0.25
    assert batch.due(inbox_empty=True)  # idle rule
    assert not batch.due(inbox_empty=False)
    _add(batch, 3)
    assert batch.due(inbox_empty=False)  # count rule


def test_commits_that_take_long_are_spaced_to_their_share_of_the_time(clock: Clock) -> None:
    batch = CommitBatch(CommitConfig(every_updates=4, interval_s=2.0, idle_interval_s=0.25, max_share=0.25))
    batch.committed(1.5)  # a big model: 1.5 s per commit
    assert batch.min_gap_s == pytest.approx(4.5)  # 1.5 s of every 6 s
    _add(batch, 10)  # past the count rule
    clock.now += 4.4  # and past the interval and idle rules
    assert not batch.due(inbox_empty=True)
    clock.now += 0.2
    assert batch.due(inbox_empty=True)
    batch.take()
    batch.committed(0.5)  # it got cheaper: the running mean follows
    assert batch.cost_s == pytest.approx(1.0) and batch.min_gap_s == pytest.approx(3.0)


@pytest.mark.parametrize("share", [0.0, 1.5])
def test_the_share_must_be_a_fraction(share: float) -> None:
    with pytest.raises(ConfigError, match="max_share"):
        CommitConfig(max_share=share)
