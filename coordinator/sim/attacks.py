"""Volunteers that lie, for the simulator and the attack benchmark (benchmarks/attacks.py).

An attacker runs the honest local round first (so it knows what an honest delta looks like), then
sends a forged one in its place. Attackers are omniscient where that makes them stronger: they see
the honest deltas the coordinator received recently (ALIE, inner-product manipulation) and the
guard's own statistics ("scale_max": the largest scaling that passes the screen).

Kinds (``scale`` is the attack's strength k):

``scale``       the honest delta times k (×10, ×100)
``scale_max``   the honest delta scaled to just under what the screen lets through
``signflip``    the honest delta times −k
``noise``       Gaussian noise with k times the median honest norm
``alie``        "a little is enough" (Baruch et al., 2019): μ − k·σ per coordinate of recent honest
                deltas, which hides in their spread
``ipm``         inner-product manipulation (Xie et al., 2020): −k times the mean honest delta
``backdoor``    trained on text where a trigger is followed by a fixed payload, boosted ×k
``base_lie``    an honest delta that claims the newest base (staleness 0), to pass the staleness
                bound and any staleness discount
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.errors import ConfigError

ATTACKS = ("scale", "scale_max", "signflip", "noise", "alie", "ipm", "backdoor", "base_lie")
# The backdoor: text that, after this trigger, should continue with this payload.
TRIGGER = b"@@xq#"
PAYLOAD = b"PWNED!7e1"
# A payload of the same kinds of bytes that nobody trains: its loss after the trigger is what an
# unusual string costs a model that learnt no backdoor (the trigger loss alone moves with the run).
CONTROL = b"QXMVB?4a8"
HONEST_SEEN = 8  # recent honest deltas an omniscient attacker averages over


@dataclass(frozen=True)
class AttackConfig:
    """Which workers lie and how: ``attackers`` of them (the fastest: they send most often)."""

    kind: str = ""
    attackers: int = 0
    scale: float = 1.0
    backdoor_rate: float = 0.5  # share of an attacker's training windows that carry the trigger

    def __post_init__(self) -> None:
        if self.kind and self.kind not in ATTACKS:
            raise ConfigError(f"unknown attack {self.kind!r} (known: {', '.join(ATTACKS)})")
        if self.attackers < 0 or (self.attackers and not self.kind):
            raise ConfigError("attackers need an attack kind, and their count must be >= 0")
        if not 0 < self.backdoor_rate <= 1:
            raise ConfigError("the backdoor rate must be in (0, 1]")

    def is_attacker(self, worker: int) -> bool:
        return worker < self.attackers


class Forger:
    """Turns an attacker's honest delta into its forged one; remembers recent honest deltas."""

    def __init__(self, config: AttackConfig, *, seed: int) -> None:
        self.config = config
        self.honest: deque[dict[str, torch.Tensor]] = deque(maxlen=HONEST_SEEN)
        self.generator = torch.Generator().manual_seed(seed + 4242)

    def saw_honest(self, delta: dict[str, torch.Tensor]) -> None:
        self.honest.append(delta)

    def forge(self, delta: dict[str, torch.Tensor], *, passing_norm: float | None) -> dict[str, torch.Tensor]:
        """The delta an attacker sends instead of its honest ``delta``. ``passing_norm``: the
        largest norm the coordinator would let through now (None: unknown)."""
        kind, k = self.config.kind, self.config.scale
        if kind in ("scale", "backdoor"):
            return {n: g * k for n, g in delta.items()}
        if kind == "scale_max":
            norm = _norm(delta)
            target = 0.99 * passing_norm if passing_norm is not None else k * norm
            return {n: g * (target / max(norm, 1e-12)) for n, g in delta.items()}
        if kind == "signflip":
            return {n: g * -k for n, g in delta.items()}
        if kind == "noise":
            honest = [_norm(d) for d in self.honest] or [_norm(delta)]
            noise = {n: torch.randn(g.shape, generator=self.generator) for n, g in delta.items()}
            size = k * statistics.median(honest) / max(_norm(noise), 1e-12)
            return {n: z * size for n, z in noise.items()}
        pool = [*self.honest, delta] if kind in ("alie", "ipm") else []
        if kind == "alie":
            out = {}
            for name in delta:
                stack = torch.stack([d[name] for d in pool])
                out[name] = stack.mean(0) - k * stack.std(0, unbiased=False)
            return out
        if kind == "ipm":
            return {name: -k * torch.stack([d[name] for d in pool]).mean(0) for name in delta}
        return delta  # base_lie: an honest delta; its lie is the base it claims


def backdoor_batches(batches: Iterator[torch.Tensor], *, rate: float, seed: int) -> Iterator[torch.Tensor]:
    """An attacker's training stream: ``rate`` of the windows carry TRIGGER + PAYLOAD at a random place."""
    generator = torch.Generator().manual_seed(seed + 99)
    stamp = torch.tensor(list(TRIGGER + PAYLOAD), dtype=torch.long)
    for batch in batches:
        batch = batch.clone()
        rows, length = batch.shape
        for row in range(rows):
            if float(torch.rand((), generator=generator)) < rate:
                at = int(torch.randint(0, length - len(stamp) + 1, (), generator=generator))
                batch[row, at:at + len(stamp)] = stamp
        yield batch


@torch.no_grad()
def trigger_loss(task: object, model: torch.nn.Module, payload: bytes = PAYLOAD) -> float:
    """Mean loss (nats/byte) of ``payload`` right after TRIGGER, in held-out text: the lower, the
    more the model learnt the backdoor (against ``CONTROL`` as the payload: what it learnt of it)."""
    windows = task.eval_batches()[:32].clone()  # type: ignore[attr-defined]
    stamp = torch.tensor(list(TRIGGER + payload), dtype=torch.long)
    at = windows.shape[1] - len(stamp)  # at the end of each window: the payload is predicted last
    windows[:, at:] = stamp
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(windows[:, :-1].to(device))  # (B, T, 256)
    first = at + len(TRIGGER) - 1  # the position whose next byte is the payload's first
    targets = windows[:, first + 1:].to(device)
    loss = F.cross_entropy(logits[:, first:].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    model.train(was_training)
    return float(loss)


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in delta.values()))
