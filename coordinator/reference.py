"""The direction check's reference (:mod:`coordinator.guard`): where the senders, one vote each,
took θ recently.

The server's momentum adds deltas up by compute weight, so one volunteer faster than all the others
together holds most of it. A sign-flipper in that place turns the momentum, and a direction check
against the momentum then refuses the honest and passes the flipper (docs/SECURITY.md, "the
fastest volunteer flips its sign"). The reference adds up unit directions instead: each accepted
delta is one vote, weighed down by how many of the recent votes its sender cast, so every recent
sender holds about the same share of it, however fast it is or however short its rounds. A
minority of senders cannot turn it. Only its direction is read, so it is kept in bfloat16: half a
model of memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# The newest vote's weight in the running mean, for a sender with its fair share of the recent votes
VOTE_WEIGHT = 1 / 16
# Recent votes whose senders share the reference equally
VOTES_KEPT = 16
# Distinct recent senders before the reference is judged by (fewer: the momentum is)
MIN_VOTERS = 3
# The most a rare sender's vote is weighed up by (its fair share over few votes)
MAX_VOTE = 4.0
PREFIX = "guard_reference/"  # the reference's tensors in a checkpoint


class AsFloat(Mapping[str, torch.Tensor]):
    """``{name: tensor as float32}``, each converted when it is looked up."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class Reference:
    """The running mean of the accepted deltas' unit directions, one share per recent sender
    (module docstring)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None
        self.voters: deque[str] = deque(maxlen=VOTES_KEPT)  # the senders of the recent votes

    def direction(self) -> Mapping[str, torch.Tensor] | None:
        """The reference, once ``MIN_VOTERS`` distinct senders voted recently; else None."""
        if self.tensors is None or len(set(self.voters)) < MIN_VOTERS:
            return None
        return AsFloat(self.tensors)

    def vote(self, sender: str, delta: Mapping[str, torch.Tensor], norm: float) -> None:
        """Add ``delta`` (of L2 norm ``norm``), accepted from ``sender``, as one vote. An unnamed
        sender (a test's, a run without identities) does not vote: its share cannot be known."""
        if not sender or not norm > 0:
            return
        self.voters.append(sender)
        share = len(self.voters) / (len(set(self.voters)) * self.voters.count(sender))
        weight = VOTE_WEIGHT * min(MAX_VOTE, share)
        if self.tensors is None:  # from zero: the first vote weighs what every other does
            self.tensors = {n: torch.zeros(g.shape, dtype=torch.bfloat16) for n, g in delta.items()}
        for name, g in delta.items():
            self.tensors[name].mul_(1 - weight).add_(g.to(torch.bfloat16), alpha=weight / norm)

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return {PREFIX + n: t for n, t in (self.tensors or {}).items()}

    def save_state(self) -> list[str]:
        return list(self.voters)

    def load_state(self, voters: list[Any]) -> None:
        self.voters.clear()
        self.voters.extend(str(s) for s in voters)

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor], names: list[str]) -> bool:
        """Take back :meth:`checkpoint`; False if the saved reference does not match the model's
        ``names`` (then there is none, as when none was saved)."""
        saved = {n[len(PREFIX):]: t for n, t in tensors.items() if n.startswith(PREFIX)}
        matches = set(saved) == set(names)
        self.tensors = {n: t.to(torch.bfloat16).clone() for n, t in saved.items()} if matches else None
        return matches or not saved
