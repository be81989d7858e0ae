"""Who sent a delta: invited volunteers only, each under its own name; forgeries settle nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.config import CoordinatorConfig
from coordinator.identity import InvitedSenders, OpenSenders
from coordinator.intake import DeltaIntake
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry
from coordinator.run_state import build_intake
from coordinator.volunteers import Volunteer, VolunteerBook, service_user
from coordinator.warm_start import WarmStart
from tests.unit.test_intake import RUN_ID, _delta


def _intake(book: VolunteerBook) -> DeltaIntake:
    config = CoordinatorConfig(checkpoint_dir=book.path.parent)
    params = {"a.weight": torch.ones(4, 3), "b": torch.zeros(5)}
    plain = OuterConfig(lr=1.0, momentum=0.0, buffer_size=1, compute_exponent=0.0)
    optimizer = make_outer_optimizer(params, plain)
    progress = RunProgress()
    intake = build_intake(config, optimizer=optimizer, registry=ClientRegistry(config.plan),
                          progress=progress, warm=WarmStart(0, progress=progress), barrier=None,
                          run_id=RUN_ID, senders=InvitedSenders(book))
    intake.take_version(5)
    return intake


def _invite(book: VolunteerBook, name: str, **kw: float) -> str:
    book.add(Volunteer(name=name, user=service_user("r", name), invited_at=0.0, **kw))
    return service_user("r", name)


def test_only_invited_volunteers_under_their_own_name(tmp_path: Path) -> None:
    book = VolunteerBook.open(tmp_path)
    alice, bob = _invite(book, "alice"), _invite(book, "bob")
    intake = _intake(book)
    forged = intake.handle(_delta(client_id="bob", seq=0), sender=alice, now=10.0)
    assert (forged.kind, forged.reason) == ("rejected", "identity_mismatch")
    stranger = intake.handle(_delta(client_id="alice", seq=0), sender="guest", now=10.0)
    assert (stranger.kind, stranger.reason) == ("rejected", "unknown_volunteer")
    # a forgery does not settle the victim's sequence number: bob's own seq 0 is applied
    assert intake.handle(_delta(client_id="bob", seq=0), sender=bob, now=11.0).kind == "applied"
    assert intake.handle(_delta(client_id="alice", seq=0), sender=alice, now=11.0).kind == "applied"
    # ... and a forgery of an applied seq is refused for its sender, not answered "duplicate"
    again = intake.handle(_delta(client_id="alice", seq=0), sender=bob, now=12.0)
    assert (again.kind, again.reason) == ("rejected", "identity_mismatch")
    assert intake.rejected_by_reason == {"identity_mismatch": 2, "unknown_volunteer": 1}


def test_revoked_and_expired_volunteers_are_refused(tmp_path: Path) -> None:
    book = VolunteerBook.open(tmp_path)
    alice, carol = _invite(book, "alice"), _invite(book, "carol", expires_at=100.0)
    intake = _intake(book)
    assert intake.handle(_delta(client_id="carol", seq=0), sender=carol, now=99.0).kind == "applied"
    late = intake.handle(_delta(client_id="carol", seq=1), sender=carol, now=100.0)
    assert (late.kind, late.reason) == ("rejected", "revoked")
    VolunteerBook.open(tmp_path).revoke("alice", now=50.0)  # `revoke`, in another process
    book.reload()
    gone = intake.handle(_delta(client_id="alice", seq=0), sender=alice, now=60.0)
    assert (gone.kind, gone.reason) == ("rejected", "revoked")


def test_a_volunteer_invited_after_the_coordinator_started_is_known_at_once(tmp_path: Path) -> None:
    book = VolunteerBook.open(tmp_path)
    intake = _intake(book)
    dave = _invite(VolunteerBook.open(tmp_path), "dave")  # another process; no housekeeping yet
    assert intake.handle(_delta(client_id="dave", seq=0), sender=dave, now=1.0).kind == "applied"


def test_open_mode_takes_any_sender() -> None:
    assert OpenSenders().refuse("guest", "anyone", 0.0) is None


def test_a_seq_far_past_the_high_water_mark_is_refused_and_moves_nothing(tmp_path: Path) -> None:
    book = VolunteerBook.open(tmp_path)
    alice = _invite(book, "alice")
    intake = _intake(book)
    assert intake.handle(_delta(client_id="alice", seq=0), sender=alice, now=1.0).kind == "applied"
    jump = intake.handle(_delta(client_id="alice", seq=10**9), sender=alice, now=2.0)
    assert (jump.kind, jump.reason) == ("rejected", "seq_jump")
    assert intake.registry.clients["alice"].max_seq == 0  # the window did not move
    # the next honest seq passes the screen and is judged by the rules as usual (one per base)
    assert intake.handle(_delta(client_id="alice", seq=1), sender=alice, now=3.0).reason == "already_sent"
