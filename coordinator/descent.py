"""The guard's descent check (Zeno++-style, Xie et al. 2020): does a delta lower the loss on data
only the coordinator holds?

Screening and clipping judge a delta by its size and direction against other deltas; an attack
that hides inside honest spread (ALIE, a small backdoor) passes both. An operator who holds the
task's data can ask the question that matters instead: does θ moved along the delta do better on a
batch the volunteer never saw? Every ``every``-th delta the guard lets through is checked on a
fresh batch drawn with the coordinator's own secret seed (a volunteer cannot tune a delta to it):

    refused (``no_descent``) when  L(θ − γ·g) − L(θ) > tolerance · L(θ)

with γ the share of the delta the outer step applies at once (ε/N). Two forward passes of one
batch per checked delta, on a copy of the coordinator's evaluation model made at the first check
(the evaluation model's parameters are θ itself: moving them would move θ); 0 turns it off (the
default). The loss before the move is computed on the same batch, so the batch's own difficulty
cancels.

With ``--guard-distrust`` (the default) the guard also tries each delta its direction check cannot
vouch for (:meth:`DescentCheck.strict`: three forward passes, no tolerance, and lower along the
delta than along its opposite).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from shared.local_round import to_device

# The part of a delta the outer step applies at the arrival (γ): e.g. ε/N.
StepShare = Callable[[], float]


class DescentCheck:
    """Checks a delta against fresh trusted batches of ``task`` (module docstring)."""

    def __init__(self, task: Any, model: torch.nn.Module, params: dict[str, torch.Tensor], *,
                 step_share: StepShare, tolerance: float, device: torch.device | str = "cpu",
                 seed: int | None = None, keep_model: bool = True) -> None:
        self.task = task
        self.template = model  # the coordinator's evaluation model, copied at the first check
        self.keep_model = keep_model
        self._model: torch.nn.Module | None = None  # that copy: θ is copied in for each check
        # keep the copy between checks (the every-k-th check); else each strict trial, rare, makes
        # and frees one: the coordinator's steady memory stays without it
        self.params = params  # θ, as the outer optimizer holds it
        self.step_share = step_share
        self.tolerance = tolerance
        self.device = torch.device(device)
        self.seed = secrets.randbits(62) if seed is None else seed  # the simulator passes its own
        self._batches: Iterator[torch.Tensor] | None = None

    def __call__(self, delta: Mapping[str, torch.Tensor], *, tolerance: float | None = None) -> str | None:
        """Why ``delta`` is refused (it raises the trusted loss beyond ``tolerance``, the check's
        own when None), or None."""
        before, after, _ = self._losses(delta, opposite=False)
        tolerance = self.tolerance if tolerance is None else tolerance
        if after - before > tolerance * abs(before):
            return (f"the trusted loss rose from {before:.4g} to {after:.4g} along it "
                    f"(tolerance {100 * tolerance:g}%)")
        return None

    def strict(self, delta: Mapping[str, torch.Tensor]) -> str | None:
        """The guard's trial of a delta the direction check cannot vouch for (coordinator.direction):
        it passes only if the trusted loss does not rise along it at all, and is lower along it
        than along its opposite. The second part is the sign of the loss's slope along the delta
        (L(θ − γg) − L(θ + γg) ≈ −2γ ∇L·g, free of the curvature), so a delta and its sign flip
        never both pass. The first alone let a flipped delta in at a run's start, where the loss
        can fall both ways along a delta (docs/SECURITY.md: 5.29 to 4.49 along a flipped one, to
        2.93 along its opposite)."""
        before, after, opposite = self._losses(delta, opposite=True)
        if not self.keep_model:
            self._model = None
        if after > before:
            return f"the trusted loss rose from {before:.4g} to {after:.4g} along it (tolerance 0%)"
        if opposite is not None and after > opposite:
            return (f"the trusted loss fell less along it ({before:.4g} to {after:.4g}) than along "
                    f"its opposite (to {opposite:.4g})")
        return None

    def _losses(self, delta: Mapping[str, torch.Tensor], *,
                opposite: bool) -> tuple[float, float, float | None]:
        """The loss of a fresh trusted batch at θ, at θ − γ·delta and (``opposite``) at θ + γ·delta."""
        batch = to_device(next(self._stream()), self.device)
        gamma = self.step_share()
        if self._model is None:
            self._model = copy.deepcopy(self.template).eval()  # storage of its own, never θ's
        model = self._model
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(self.params[name])
            before = float(self.task.loss(model, batch))
            for name, param in named.items():
                param.sub_(delta[name].to(param.device, param.dtype), alpha=gamma)
            after = float(self.task.loss(model, batch))
            if not opposite:
                return before, after, None
            for name, param in named.items():
                param.add_(delta[name].to(param.device, param.dtype), alpha=2 * gamma)
            return before, after, float(self.task.loss(model, batch))

    def _stream(self) -> Iterator[torch.Tensor]:
        if self._batches is None:  # a secret seed and shard: no volunteer can fit a delta to them
            shard = self.seed % max(1, int(getattr(self.task, "num_shards", 1)))
            self._batches = self.task.train_batches(shard, self.seed)
        return self._batches
