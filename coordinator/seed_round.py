"""The guard's seed round: one round the coordinator trains itself, so that the guard never starts blind.

Without something trusted to begin with, the guard's statistics are its first deltas' own, and a
run's first deltas have no direction to be judged by: a fast volunteer that lies from the start
sends first and most, and in the simulator its first delta, scaled to the largest the intake
takes (|g| = |θ|), was tried on the operator's data and let in (from a random model nearly any
step along a descent direction lowers the loss, however long), then set the median that judged
the next ones (docs/SECURITY.md measures it).

So at a run's fresh start the coordinator trains one round of its own: H local steps from θ₀, on a
batch stream of the task's data drawn with its own secret seed, with the run's inner settings,
exactly as a volunteer's round. The guard *observes* the round's delta as it observes a trusted
warm start's (:meth:`coordinator.guard.DeltaGuard.observe`): from the first stranger's delta there
is a size to judge by (the reject bound and the clip's τ) and a direction (the trusted delta is
the centre until the momentum has one of its own). The round does not move θ: the model the
volunteers start from is the one the seed made, and only volunteers train it.

It costs one round of compute on the coordinator's device at a fresh start (none on a resume: the
checkpoint keeps the guard's statistics); ``serve --no-guard-seed-round`` skips it, and a warm
start by a holder the operator names makes it redundant (its deltas are trusted from the first).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any

import torch

from shared.local_round import InnerConfig, LocalTrainer

log = logging.getLogger(__name__)


def seed_round(task: Any, inner: InnerConfig, base: Mapping[str, torch.Tensor], *, steps: int,
               device: torch.device | str = "cpu", seed: int | None = None) -> dict[str, torch.Tensor]:
    """The pseudo-gradient (fp32, on the CPU) of ``steps`` local steps from ``base`` on the task's
    data, drawn with ``seed`` (a secret one when None: no volunteer can predict it)."""
    seed = secrets.randbits(62) if seed is None else seed
    started = time.perf_counter()
    trainer = LocalTrainer(task=task, inner=inner, device=torch.device(device),
                           shard=seed % max(1, int(getattr(task, "num_shards", 1))), seed=seed)
    trainer.load_base(dict(base))
    trainer.train(steps, global_step=0)
    delta = {name: g.to(torch.float32) for name, g in trainer.pseudo_gradient().items()}  # on the CPU
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in delta.values()))
    log.info("guard: seed round of %d steps on the operator's data, |g| = %.4g (%.1f s)", steps, norm,
             time.perf_counter() - started)
    return delta
