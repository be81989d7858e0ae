"""``--overlap`` without servers: where a stacked round starts (the newest snapshot moved by the
client's in-flight deltas as the coordinator moves θ at their arrival), which deltas count as in
flight, and the outer optimizers' arrival shares that say how far."""

from __future__ import annotations

from dataclasses import replace

import torch

from client.overlap import InFlight, MidRoundRebase, Overlap
from client.report import DeltaFate, RoundReport
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from shared.local_round import InnerConfig, LocalTrainer
from shared.verdict import Verdict
from tests.unit.test_local_round import LinearRegressionTask


class Waits:
    """The inclusion wait's verdicts, as a test sets them; its waits, recorded (nothing comes)."""

    client_id = "me"

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], Verdict] = {}
        self.waited: list[tuple[str, int]] = []

    def read_verdicts(self, block_s: float) -> list[Verdict]:
        return []

    def until_included(self, *, run_id: str, seq: int, base_version: int, within_s: float) -> DeltaFate:
        self.waited.append(("included", seq))
        return DeltaFate()

    def for_newer_base(self, *, run_id: str, last_base: int, poll_s: float, on_notice: object) -> None:
        self.waited.append(("newer than", last_base))


def _report(seq: int) -> RoundReport:
    return RoundReport(round=seq + 1, seq=seq, base_version=0, planned_steps=3, steps=3, train_loss=1.0,
                       compute_s=1.0, tokens=10, sent_bytes=10, sent=True, upload_s=0.1, staleness=0)


def _trainer() -> LocalTrainer:
    task = LinearRegressionTask()
    trainer = LocalTrainer(task=task, inner=InnerConfig(), device=torch.device("cpu"), shard=0, seed=0)
    trainer.load_base({n: torch.zeros_like(p) for n, p in trainer.model.named_parameters()})
    return trainer


def _entry(trainer: LocalTrainer, seq: int, value: float, share: float = 0.5) -> InFlight:
    delta = {n: torch.full_like(b, value) for n, b in trainer.base.items()}
    return InFlight(run_id="r", seq=seq, share=share, delta=delta, report=_report(seq))


def test_a_round_starts_from_the_snapshot_moved_by_each_in_flight_delta_once() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    overlap.add(_entry(trainer, 0, 1.0))
    assert overlap.stack(trainer, run_id="r", version=3, fresh_base=True) == 0
    assert all(torch.equal(b, torch.full_like(b, -0.5)) for b in trainer.base.values())
    assert all(torch.equal(p, torch.full_like(p, -0.5)) for p in trainer.model.parameters())
    overlap.add(_entry(trainer, 1, 2.0))
    # the same snapshot again: only the new delta moves it further
    assert overlap.stack(trainer, run_id="r", version=3, fresh_base=False) == 1
    assert all(torch.equal(b, torch.full_like(b, -1.5)) for b in trainer.base.values())
    # a newer snapshot holds delta 0 (its manifest settles seqs up to 0): only delta 1 moves it
    trainer.load_base({n: torch.zeros_like(b) for n, b in trainer.base.items()})
    overlap.learn(run_id="r", version=4, progress={"client_seqs": {"me": 0}})
    assert overlap.stack(trainer, run_id="r", version=4, fresh_base=True) == 1
    assert all(torch.equal(b, torch.full_like(b, -1.0)) for b in trainer.base.values())


def test_what_was_stacked_on_a_base_comes_off_again_and_a_new_base_forgets_it() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    overlap.add(_entry(trainer, 0, 1.0))
    overlap.add(_entry(trainer, 1, 2.0, share=0.25))
    assert overlap.stack(trainer, run_id="r", version=3, fresh_base=True) == 1
    assert all(torch.equal(b, torch.full_like(b, -1.0)) for b in trainer.base.values())
    trainer.unstack_base()  # before patches for the snapshot go on (client/replica.py)
    assert trainer.stacked == [] and all(torch.equal(b, torch.zeros_like(b)) for b in trainer.base.values())
    trainer.stack_on_base({n: torch.ones_like(b) for n, b in trainer.base.items()}, 1.0)
    trainer.load_base({n: torch.zeros_like(b) for n, b in trainer.base.items()})
    assert trainer.stacked == []  # a base read whole holds nothing of ours


def test_reports_wait_for_their_verdict_and_come_out_in_order() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    overlap.add(_entry(trainer, 0, 1.0))
    overlap.add(_entry(trainer, 1, 1.0))
    waits.seen[("r", 1)] = Verdict("r", 1, True, version=7)
    # 0 in snapshot 6 (its manifest settles seqs up to 0), no verdict yet
    overlap.learn(run_id="r", version=6, progress={"client_seqs": {"me": 0}})
    assert overlap.settled_reports() == []  # 0's verdict is written just after its snapshot: wait
    assert not overlap.in_flight[0].pending and not overlap.in_flight[1].pending
    waits.seen[("r", 0)] = Verdict("r", 0, False, "stale")  # rejected after all
    overlap.learn(run_id="r", version=6, progress={"client_seqs": {"me": 0}})
    done = overlap.settled_reports()
    assert [(r.seq, r.fate.describe()) for r in done] == [(0, "rejected: stale"), (1, "applied v=7")]
    assert not overlap.active


def test_a_rejected_or_foreign_delta_never_moves_a_base() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    overlap.add(_entry(trainer, 0, 1.0))
    waits.seen[("r", 0)] = Verdict("r", 0, False, "bad_norm")
    overlap.learn(run_id="r", version=2, progress={"client_seqs": {}})
    assert overlap.stack(trainer, run_id="r", version=2, fresh_base=True) == -1
    assert all(torch.equal(b, torch.zeros_like(b)) for b in trainer.base.values())
    overlap.add(_entry(trainer, 1, 1.0))
    # a new run: the old one's fate is lost
    overlap.learn(run_id="other", version=0, progress={"client_seqs": {}})
    assert overlap.stack(trainer, run_id="other", version=0, fresh_base=True) == -1
    assert [r.fate.describe() for r in overlap.settled_reports()] == ["rejected: bad_norm", "outcome=?"]


def test_the_arrival_share_is_what_the_outer_step_moves_theta_by_at_once() -> None:
    params = {"w": torch.zeros(3)}
    for strategy, expected in (("edn", 0.5 * 1.8 / 4), ("dn", 0.5 / 4), ("sync", 0.0), ("fedbuff", 0.0)):
        config = OuterConfig(strategy=strategy, lr=0.5, momentum=0.8)
        optimizer = make_outer_optimizer(params, config)
        assert abs(optimizer.arrival_share(4.0) - expected) < 1e-12, strategy
        if expected:  # a first arrival (no momentum yet) moves θ by exactly that share of it
            optimizer.step({"w": torch.ones(3)}, active_clients=4)
            assert torch.allclose(optimizer.params["w"], torch.full((3,), -expected)), strategy


def test_a_stalled_coordinator_holds_an_overlapping_client_to_two_deltas_in_flight() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    overlap.add(_entry(trainer, 0, 1.0))
    overlap.wait_for_room(5.0, poll_s=0.1, on_notice=print)
    assert waits.waited == []  # one pending while the next round trains: no wait
    overlap.add(replace(_entry(trainer, 1, 1.0), report=replace(_report(1), base_version=4)))
    overlap.wait_for_room(5.0, poll_s=0.1, on_notice=print)
    # the oldest waited for in vain, then a version newer than the newest delta's base
    assert waits.waited == [("included", 0), ("newer than", 4)]
    assert overlap.in_flight[0].given_up and overlap.in_flight[1].pending
    assert [r.fate.describe() for r in overlap.settled_reports()] == ["outcome=?"]


def test_a_round_may_move_on_once_every_delta_its_base_was_moved_by_is_settled() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    assert overlap.landed("r") is None  # nothing stacked: nothing to wait for
    overlap.add(_entry(trainer, 0, 1.0))
    assert overlap.stack(trainer, run_id="r", version=3, fresh_base=True) == 0
    assert overlap.landed("r") is None and overlap.stacked_on == 0  # still on its way
    assert overlap.landed("other") is None  # another run's base: not this one's
    waits.seen[("r", 0)] = Verdict("r", 0, True, version=5)
    assert overlap.landed("r") == 5  # in snapshot 5
    overlap.rebased("r", 5)
    assert overlap.stacked_on == -1 and overlap.landed("r") is None
    # snapshot 5 holds it: the next round on that base is not moved by it again
    assert overlap.stack(trainer, run_id="r", version=5, fresh_base=False) == -1


def test_a_refused_delta_lets_the_round_move_on_without_it() -> None:
    trainer, waits = _trainer(), Waits()
    overlap = Overlap(waits)  # type: ignore[arg-type]
    overlap.add(_entry(trainer, 0, 1.0))
    overlap.stack(trainer, run_id="r", version=3, fresh_base=True)
    waits.seen[("r", 0)] = Verdict("r", 0, False, "bad_norm")
    assert overlap.landed("r") == -1  # in no snapshot: whatever is newest will do


class _Snapshot:
    class manifest:  # noqa: N801 - stands in for a SnapshotManifest
        total_bytes = 1000


class _Fetcher:
    def __init__(self, newest: int) -> None:
        self.newest = newest
        self.whole_reads = 0

    def current_version(self, max_age_s: float = 0.0) -> int:
        return self.newest

    def read_latest(self) -> _Snapshot:
        self.whole_reads += 1
        return _Snapshot()


class _Replica:
    """Holds version 3; its patches to the newest either are gone (version kept) or fail half-way
    (no version left)."""

    def __init__(self, trainer: LocalTrainer, *, half_patched: bool) -> None:
        self.trainer, self.version, self.run_id = trainer, 3, "r"
        self.half_patched = half_patched

    def catch_up(self, fetcher: _Fetcher, version: int, *, carry: bool) -> int:
        if self.half_patched:
            self.version = None
        return 0

    def rebase_onto(self, snapshot: _Snapshot) -> bool:
        self.version = 7
        return True


def test_following_moves_only_by_patches_unless_a_failed_patch_left_no_base() -> None:
    for half_patched, whole_reads, version in ((False, 0, 3), (True, 1, 7)):
        replica, fetcher = _Replica(_trainer(), half_patched=half_patched), _Fetcher(7)
        read: list[tuple[int, int]] = []
        rebase = MidRoundRebase(Overlap(Waits()), replica, fetcher,  # type: ignore[arg-type]
                                on_read=lambda v, n, read=read: read.append((v, n)), follow=True)
        rebase.between_steps()
        assert (fetcher.whole_reads, replica.version) == (whole_reads, version), half_patched
        assert read == ([(7, 1000)] if half_patched else [])
        rebase.between_steps()  # within LOOK_S of the last look: not even a look
        assert fetcher.whole_reads == whole_reads
