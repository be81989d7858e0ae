"""The durability oracle: what clients were promised against what the coordinator committed.

Jepsen's idea at the scale of one run. Each side writes down what it knows:

* a client appends ``client_id:seq`` to its journal (fsynced) once the broker confirmed a delta
  (``asyncloco-client join --journal``): these deltas were *promised*;
* the coordinator appends every settled outcome to ``applied.jsonl`` in its checkpoint directory
  as part of each commit (``coordinator/applied_log.py``, read with
  ``read_committed(dir)``): these were *applied* or *rejected*.

After the run, with every process stopped: lost = confirmed − (applied ∪ rejected) must be empty,
no id may be applied twice, and nothing may be applied that no client confirmed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.applied_log import read_applied_log
from coordinator.checkpoint import load_checkpoint


def read_journal(path: Path) -> list[str]:
    """Confirmed delta ids of one client, in confirm order (a torn last line is not an entry)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [line for line in text.split("\n")[:-1] if line]  # only newline-terminated lines


@dataclass
class Verdict:
    """The oracle's findings; ``ok`` when nothing was lost, doubled or invented."""

    confirmed: set[str]
    applied: Counter[str]
    rejected: dict[str, list[str]]  # id → reasons
    duplicates_seen: int  # redeliveries recognised and only acked (harmless, and expected here)
    lost: set[str] = field(default_factory=set)
    duplicated: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def summary(self) -> str:
        return (f"confirmed={len(self.confirmed)} applied={sum(self.applied.values())} "
                f"rejected={sum(len(r) for r in self.rejected.values())} "
                f"duplicates_recognised={self.duplicates_seen} lost={sorted(self.lost)} "
                f"duplicated={sorted(self.duplicated)} unexpected={sorted(self.unexpected)}")


def judge(confirmed: set[str], entries: list[dict[str, Any]]) -> Verdict:
    """Compare what clients were promised (``confirmed`` ids) with the applied log's ``entries``."""
    applied: Counter[str] = Counter()
    rejected: dict[str, list[str]] = {}
    duplicates = 0
    for entry in entries:
        if entry["outcome"] == "applied":
            applied[entry["id"]] += 1
        elif entry["outcome"] == "rejected":
            rejected.setdefault(entry["id"], []).append(entry["reason"])
        else:
            duplicates += 1
    verdict = Verdict(confirmed, applied, rejected, duplicates)
    verdict.lost = confirmed - set(applied) - set(rejected)
    verdict.duplicated = {i for i, n in applied.items() if n > 1} | (set(applied) & set(rejected))
    verdict.unexpected = set(applied) - confirmed
    return verdict


def read_committed(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The applied log's entries that the checkpoint covers (``applied_log_bytes``): what a restart
    keeps. No checkpoint means nothing is committed."""
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint is None:
        return []
    return read_applied_log(checkpoint_dir, up_to_bytes=int(checkpoint.state.get("applied_log_bytes", 0)))


def settled_ids(checkpoint_dir: Path) -> set[str]:
    """Ids whose outcome a landed commit recorded: a run has drained once this holds every confirmed id."""
    return {e["id"] for e in read_committed(checkpoint_dir)}
