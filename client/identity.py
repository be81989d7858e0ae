"""Who this client is, and which delta sequence numbers it has used: both kept in its state dir.

Layout of the state directory (by default ``$XDG_STATE_HOME/asyncloco`` or ``~/.local/state/asyncloco``:
:func:`shared.files.default_state_dir`)::

    client-id            the generated client id (slot 1), kept across restarts
    client-id.2 ...      ids of further slots, used when another process on this machine holds slot 1
    client-id*.lock      held (flock) by the process using that slot
    seq-<id>.json        {"client_id": id, "runs": {run_id: next_seq}}
    seq-<id>.lock        taken while a number is reserved

A sequence number is *reserved* (``next_seq`` written to disk with temp file + fsync + rename) before
the delta carrying it is published, so across crashes and restarts a number is never used for two
different deltas; a number whose delta was never confirmed is simply skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from shared.errors import ConfigError
from shared.files import write_atomically

try:  # POSIX only; without it (Windows) the state dir is simply not shared between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_SLOTS = 64  # generated ids per state dir, i.e. clients that can run at once from one state dir
MAX_RUNS_KEPT = 64  # runs whose sequence counter is remembered; the oldest are dropped


def validate_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is 1-64 characters of ``[A-Za-z0-9_.-]``, else raise ConfigError."""
    if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
        raise ConfigError(
            f"invalid client id {client_id!r}: use 1-64 letters, digits, '_', '.' or '-'"
        )
    return client_id


def _try_lock(path: Path) -> IO[bytes] | None:
    """Open and exclusively lock ``path`` without waiting; None if another process holds it."""
    handle = open(path, "ab")
    if fcntl is None:  # pragma: no cover
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block: the other
    processes that use the same state dir wait (POSIX; elsewhere no lock is taken)."""
    with open(path, "ab") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


class ClientIdentity:
    """This client's stable id and its per-run delta sequence counter, backed by the state dir.

    Use :meth:`open`; call :meth:`close` (or use it as a context manager) to release the slot lock.
    """

    def __init__(self, client_id: str, state_dir: Path, slot_lock: IO[bytes] | None = None) -> None:
        self.client_id = validate_client_id(client_id)
        self.state_dir = state_dir
        self._slot_lock = slot_lock
        self.seq_path = state_dir / f"seq-{client_id}.json"
        self._seq_lock_path = state_dir / f"seq-{client_id}.lock"

    @classmethod
    def open(cls, state_dir: Path, client_id: str | None = None) -> ClientIdentity:
        """Use ``client_id`` if given, else the generated id of the first free slot in ``state_dir``.

        A generated id is created once per slot and kept across restarts. Several processes sharing
        one state dir get different slots (hence different ids) instead of colliding.
        """
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state dir {state_dir}: {exc.strerror}") from exc
        if client_id is not None:
            return cls(client_id, state_dir)
        for slot in range(1, MAX_SLOTS + 1):
            name = "client-id" if slot == 1 else f"client-id.{slot}"
            lock = _try_lock(state_dir / f"{name}.lock")
            if lock is None:
                continue  # another client process on this machine uses this slot
            try:
                return cls(_read_or_create_id(state_dir / name), state_dir, lock)
            except BaseException:
                lock.close()
                raise
        raise ConfigError(
            f"all {MAX_SLOTS} client-id slots in {state_dir} are in use; pass --client-id or --state-dir"
        )

    def close(self) -> None:
        if self._slot_lock is not None:
            self._slot_lock.close()
            self._slot_lock = None

    def __enter__(self) -> ClientIdentity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self.seq_path.read_bytes()
        except FileNotFoundError:
            return {"client_id": self.client_id, "runs": {}}
        try:
            state = json.loads(raw)
            if not isinstance(state, dict) or not isinstance(state.get("runs"), dict):
                raise ValueError("no 'runs' map")
            if not all(isinstance(v, int) and v >= 0 for v in state["runs"].values()):
                raise ValueError("a counter is not a non-negative integer")
        except ValueError as exc:
            # Guessing a counter could reuse a number for a different delta: refuse instead.
            raise ConfigError(
                f"sequence state {self.seq_path} is unreadable ({exc}); use another --client-id, "
                "or delete the file only if no delta of this client id can still be pending"
            ) from None
        return state

    def next_seq(self, run_id: str) -> int:
        """The number the next :meth:`reserve_seq` for ``run_id`` will return (nothing is written)."""
        return int(self._read_state()["runs"].get(run_id, 0))

    def reserve_seq(self, run_id: str) -> int:
        """Take the next sequence number of ``run_id`` and durably record it as used, then return it."""
        with locked_file(self._seq_lock_path):
            state = self._read_state()
            runs: dict[str, int] = state["runs"]
            seq = int(runs.pop(run_id, 0))
            runs[run_id] = seq + 1  # re-inserted last: the dict stays ordered oldest run first
            while len(runs) > MAX_RUNS_KEPT:
                runs.pop(next(iter(runs)))
            state["client_id"] = self.client_id
            write_atomically(self.seq_path, json.dumps(state, indent=1).encode())
        return seq


def _read_or_create_id(path: Path) -> str:
    try:
        client_id = path.read_text().strip()
    except FileNotFoundError:
        client_id = f"c-{secrets.token_hex(6)}"  # random, so it names no person or machine
        write_atomically(path, (client_id + "\n").encode())
        log.info("generated client id %s (kept in %s)", client_id, path)
        return client_id
    try:
        return validate_client_id(client_id)
    except ConfigError:
        raise ConfigError(f"{path} holds no valid client id; delete it to get a new one") from None
