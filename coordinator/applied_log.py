"""The applied log: one JSON line per settled delta, committed together with the checkpoint.

``applied.jsonl`` in the checkpoint directory says what became of every delivery that a commit
settled, over the whole run::

    {"id": "fast:12", "outcome": "applied", "reason": "", "version": 41}
    {"id": "slow:3", "outcome": "rejected", "reason": "stale", "version": 41}
    {"id": "fast:12", "outcome": "duplicate", "reason": "duplicate", "version": 42}

(``id`` is ``client_id:seq``, empty for a body that did not decode; ``version`` is the version the
commit produced.) It is the coordinator's half of the durability oracle (``harness/oracle.py``): a delta
confirmed to a client must appear here as ``applied`` exactly once, or as ``rejected``.

Why it can never disagree with the checkpoint: a commit appends its batch's lines and fsyncs them
*before* the checkpoint is renamed into place, and the checkpoint records the log's byte length.
On ``--resume`` the log is cut back to that length, so lines of a batch whose checkpoint never
landed (the coordinator died in between) vanish with the batch; those deliveries were never acked,
the broker redelivers them, and their lines are written again by the commit that does land. The
per-client ``recent_seqs`` window in the checkpoint only remembers recent seqs (for de-duplication);
this log remembers everything, at ~60 bytes a delta (a million deltas ≈ 60 MB: it is never rotated).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILENAME = "applied.jsonl"


class AppliedLog:
    """Appends settled outcomes to ``directory/applied.jsonl``; knows its committed length."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILENAME
        self.length = 0  # bytes covered by the newest checkpoint (or written since)

    def reset(self, length: int) -> None:
        """Cut the log back to ``length`` bytes, the length the restored checkpoint recorded.

        A log shorter than that was damaged or deleted by hand: say so and carry on from what
        is there (training does not depend on this log, only the oracle does).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            size = fh.tell()
            if size < length:
                log.warning("%s has %d bytes, the checkpoint recorded %d; it lost entries",
                            self.path, size, length)
            elif size > length:
                log.info("dropping %d bytes of uncommitted entries from %s", size - length, self.path)
                fh.truncate(length)
                fh.flush()
                os.fsync(fh.fileno())
            self.length = min(size, length)

    def append(self, entries: Iterable[dict[str, Any]]) -> int:
        """Append one line per entry, fsync, and return the new length (to record in the checkpoint)."""
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries).encode()
        if data:
            with open(self.path, "ab") as fh:
                # Anything past self.length is not ours (a torn tail): append mode writes at the new end.
                fh.truncate(self.length)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self.length += len(data)
        return self.length


def read_applied_log(directory: Path, *, up_to_bytes: int | None = None) -> list[dict[str, Any]]:
    """Entries of the applied log in ``directory``, oldest first (the oracle's and operators' reader).

    ``up_to_bytes``: read only that many bytes, e.g. the checkpoint's ``applied_log_bytes`` (what a
    restart would keep: see :func:`harness.oracle.read_committed`). Otherwise every whole line is
    read, including a batch whose checkpoint has not landed yet; a torn last line (no newline) is
    never an entry.
    """
    path = directory / FILENAME
    if not path.exists():
        return []
    data = path.read_bytes()
    if up_to_bytes is not None:
        data = data[:up_to_bytes]
    return [json.loads(line) for line in data.decode().split("\n")[:-1] if line.strip()]
