"""The delta guard's probation (:mod:`coordinator.guard`, rule 4): each sender's last judgements
are kept; a sender with ``strikes`` or more of its last ``length`` refused for size or clipped is
on probation, and its deltas are still judged (a clean one counts in its favour) but not applied
(``probation``) until fewer are. A liar whose deltas each get clipped back to size would otherwise
keep steering θ by the clip's bound every round (a boosted backdoor partly took that way); an
honest volunteer is clipped rarely (docs/SECURITY.md has the measured share) and so stays off it.
A refusal for direction is no strike: when the momentum itself is wrong, honest senders are
refused that way.
"""

from __future__ import annotations

from collections import deque

from coordinator.direction import record_of


class Probation:
    """Per sender, its last judgements: True where refused or clipped (module docstring)."""

    def __init__(self, strikes: int, length: int) -> None:
        self.strikes = strikes  # 0: nobody is ever on probation
        self.length = length
        self.records: dict[str, deque[bool]] = {}

    def strike(self, sender: str, flagged: bool) -> str | None:
        """Add a judgement to ``sender``'s record; say why it is on probation, or None. An
        unnamed sender (a test's, the simulator's without identities) keeps no record."""
        if not sender or not self.strikes:
            return None
        record = record_of(self.records, sender, self.length)
        record.append(flagged)
        strikes = sum(record)
        if strikes < self.strikes:
            return None
        return (f"{strikes} of this sender's last {len(record)} deltas were refused or clipped; its "
                f"deltas are judged but not applied until fewer than {self.strikes} are")

    def save_state(self) -> dict[str, list[int]]:
        """The records, for a checkpoint."""
        return {s: [int(f) for f in r] for s, r in self.records.items()}

    def load_state(self, saved: dict[str, list[int]]) -> None:
        self.records = {str(s): deque((bool(f) for f in r), maxlen=self.length) for s, r in saved.items()}
