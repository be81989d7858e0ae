"""Who was invited to a run: the volunteer book, kept beside the run's checkpoint.

``invite`` and ``revoke`` (separate processes, on the coordinator's machine) write
``volunteers.json`` in the checkpoint directory, whole or not at all and under a lock; the serving
coordinator re-reads it when it changes (every housekeeping pass looks at its mtime), so a revoked
volunteer's queued deltas are refused ``revoked`` within a second or two.

Each volunteer has one name, which is its client id, and one broker and Redis user
(``asyncloco.RUN.NAME``): RabbitMQ stamps every message with the user that published it (the
validated ``user_id`` property), so a delta is credited to the volunteer whose credentials sent
it, whatever client id it claims.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.files import write_atomically

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FILENAME = "volunteers.json"


def service_user(run: str, name: str) -> str:
    """The broker and Redis user name of volunteer ``name`` in ``run``."""
    return f"asyncloco.{run}.{name}"


@dataclass(frozen=True)
class Volunteer:
    name: str  # its client id
    user: str  # its broker and Redis user
    invited_at: float
    expires_at: float | None = None  # unix time; None = never
    revoked_at: float | None = None
    # SHA-256 (hex) of its Redis password, never the password: enough for the coordinator to
    # create its Redis user again (ACL SETUSER #hash) after a Redis that kept no ACL file restarts
    redis_password_sha256: str = ""

    def refusal(self, now: float) -> tuple[str, str] | None:
        """Why this volunteer's deltas are refused now, or None if they are welcome."""
        if self.revoked_at is not None:
            return "revoked", f"volunteer {self.name} was revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "revoked", f"the invitation of volunteer {self.name} expired"
        return None


class VolunteerBook:
    """The volunteers of one run, read from and written to ``directory/volunteers.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILENAME
        self.volunteers: dict[str, Volunteer] = {}
        self._by_user: dict[str, Volunteer] = {}
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime, size) of the file last read

    @classmethod
    def open(cls, directory: Path) -> VolunteerBook:
        book = cls(directory)
        book.reload()
        return book

    def by_user(self, user: str) -> Volunteer | None:
        return self._by_user.get(user)

    def reload(self) -> bool:
        """Read the file if it changed since the last read; True if it did.

        Every write replaces the file (a new inode), so a change is seen even within one tick of
        the file system's clock.
        """
        try:
            st = self.path.stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and (seen is not None or not self.volunteers):
            return False
        self._seen = seen
        self._set(self._read() if seen is not None else {})
        return True

    def _set(self, volunteers: dict[str, Volunteer]) -> None:
        self.volunteers = volunteers
        self._by_user = {v.user: v for v in volunteers.values()}

    def _read(self) -> dict[str, Volunteer]:
        try:
            data = json.loads(self.path.read_text())
            return {name: Volunteer(**entry) for name, entry in data["volunteers"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path} is unreadable ({exc}); restore it from a backup") from exc

    @contextlib.contextmanager
    def editing(self) -> Iterator[dict[str, Volunteer]]:
        """Change the book under an exclusive lock: read, yield a copy to change, write it whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "ab") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            current = self._read() if self.path.exists() else {}
            changed = dict(current)
            yield changed
            if changed != current:
                data: dict[str, Any] = {"volunteers": {n: asdict(v) for n, v in sorted(changed.items())}}
                write_atomically(self.path, json.dumps(data, indent=1).encode())
                os.chmod(self.path, 0o600)
            self._set(changed)
            self._seen = None  # the next reload() reads what was written

    def add(self, volunteer: Volunteer) -> None:
        with self.editing() as volunteers:
            existing = volunteers.get(volunteer.name)
            if existing is not None and existing.revoked_at is None:
                raise ConfigError(f"volunteer {volunteer.name!r} is already invited; revoke it first")
            volunteers[volunteer.name] = volunteer

    def revoke(self, name: str, *, now: float | None = None) -> Volunteer:
        with self.editing() as volunteers:
            existing = volunteers.get(name)
            if existing is None:
                raise ConfigError(f"no volunteer {name!r} in {self.path}")
            revoked = replace(existing, revoked_at=time.time() if now is None else now)
            volunteers[name] = revoked
            return revoked
