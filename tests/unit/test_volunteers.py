"""The volunteer book: invited, expired, revoked; written whole, re-read when it changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coordinator.volunteers import Volunteer, VolunteerBook, service_user
from shared.errors import ConfigError


def _volunteer(name: str = "alice", **kw: float) -> Volunteer:
    return Volunteer(name=name, user=service_user("r1", name), invited_at=100.0, **kw)


def test_invited_volunteers_are_found_by_their_user_and_survive_a_reopen(tmp_path: Path) -> None:
    book = VolunteerBook.open(tmp_path)
    book.add(_volunteer())
    assert book.by_user("asyncloco.r1.alice") == _volunteer()
    assert os.stat(tmp_path / "volunteers.json").st_mode & 0o077 == 0  # not readable by others
    again = VolunteerBook.open(tmp_path)
    assert again.volunteers == {"alice": _volunteer()}
    with pytest.raises(ConfigError, match="already invited"):
        again.add(_volunteer())


def test_expiry_and_revocation_refuse_deltas(tmp_path: Path) -> None:
    assert _volunteer().refusal(now=10**9) is None
    assert _volunteer(expires_at=200.0).refusal(now=199.0) is None
    expired = ("revoked", "the invitation of volunteer alice expired")
    assert _volunteer(expires_at=200.0).refusal(now=200.0) == expired
    book = VolunteerBook.open(tmp_path)
    book.add(_volunteer())
    revoked = book.revoke("alice", now=300.0)
    assert revoked.refusal(now=301.0) == ("revoked", "volunteer alice was revoked")
    book.add(_volunteer())  # a revoked name may be invited again
    with pytest.raises(ConfigError, match="no volunteer"):
        book.revoke("bob")


def test_a_serving_coordinator_sees_what_another_process_wrote(tmp_path: Path) -> None:
    serving = VolunteerBook.open(tmp_path)
    assert serving.by_user("asyncloco.r1.alice") is None and not serving.reload()
    VolunteerBook.open(tmp_path).add(_volunteer())  # `invite`, in another process
    assert serving.reload() and serving.by_user("asyncloco.r1.alice") is not None
    mtime = (tmp_path / "volunteers.json").stat().st_mtime_ns
    VolunteerBook.open(tmp_path).revoke("alice", now=5.0)
    os.utime(tmp_path / "volunteers.json", ns=(mtime, mtime))  # even within one tick of the clock
    assert serving.reload() and not serving.reload()
    assert serving.volunteers["alice"].revoked_at == 5.0


def test_a_damaged_book_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "volunteers.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        VolunteerBook.open(tmp_path)
