"""Outer optimizers of asynchronous Local-SGD: how arriving pseudo-gradients move θ.

``dn`` — Delayed Nesterov (Liu et al., 2024, Algorithm 3), the default. On each arriving ``g``
(``N`` = buffer size, ``c`` ∈ [0, 1/N], 0 by default)::

    Δ += g;  t += 1
    if t % N == 0:  m = β·m + Δ/N;  θ -= ε·((1 − c·N + c)·β·m + g/N);  Δ = 0   # momentum once per N
    else:           θ -= ε·(c·β·m + g/N)                                       # plain step, m frozen

Over N arrivals the momentum term weighs (N − 1)·c + (1 − c·N + c) = 1 in all: the cycle moves θ by
one Nesterov step on the mean of the N deltas, exactly with c = 0, and with c > 0 up to
ε·c·(N − 1)·β·(m_before − m_after) (c spreads part of the momentum step over the cycle, using the
momentum of the cycle before).

``nesterov`` — Nesterov on every arrival (the paper's "Async DiLoCo"): ``m = β·m + g/N;
θ -= ε·(β·m + g/N)``. It over-counts momentum (about 7% worse perplexity in the paper).

``sgd`` — no outer momentum: ``θ -= ε·g/N``.

``fedbuff`` — buffer N arrivals, then ``θ -= ε·mean(buffer)`` (FedBuff, Nguyen et al., 2022).

``sync`` — synchronous DiLoCo: deltas of one round are only buffered; when the round's barrier
completes (:meth:`SyncNesterov.complete_round`), one Nesterov step on their mean.

Every strategy may discount a stale delta by ``(1 + staleness)^-a`` (``staleness_exponent`` a;
0 = off); deltas beyond the staleness cut-off never get here (the intake discards them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coordinator.run_mode import RunMode
from shared.errors import ConfigError

ASYNC_STRATEGIES = ("dn", "nesterov", "sgd", "fedbuff")
STRATEGIES = (*ASYNC_STRATEGIES, "sync")


@dataclass(frozen=True)
class OuterConfig:
    """Outer optimizer settings. DiLoCo's defaults: ε = 0.7, β = 0.9.

    ``buffer_size`` N = 0 means "the number of active clients, at least ``min_buffer``", re-read at
    every arrival: with ``min_buffer`` above 1, the run's very first deltas (one client heard from
    so far) do not each take a full momentum step. ``c`` must be at most 1/N (with N from active
    clients, it is capped at 1/N at each arrival). If eval
    loss oscillates (small H, few clients, from scratch), lower ``momentum`` to 0.8 and ``lr`` to
    0.5; if it falls too slowly with many clients, raise ``buffer_size`` rather than ``lr``.
    If slow clients' stale deltas hurt, set ``staleness_exponent`` to 0.5.
    """

    strategy: str = "dn"
    lr: float = 0.7
    momentum: float = 0.9
    buffer_size: int = 0
    min_buffer: int = 1
    c: float = 0.0
    staleness_exponent: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown outer strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})")
        if not self.lr > 0:
            raise ConfigError("outer lr must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError("outer momentum must be in [0, 1)")
        if self.buffer_size < 0:
            raise ConfigError("buffer size N must be >= 0 (0 = number of active clients)")
        if self.min_buffer < 1:
            raise ConfigError("the minimum buffer size must be >= 1")
        if not 0 <= self.c <= 1:
            raise ConfigError("c must be in [0, 1/N]")
        if self.buffer_size and self.c > 1 / self.buffer_size:
            raise ConfigError(f"c must be at most 1/N = {1 / self.buffer_size:.3g} with buffer size "
                              f"{self.buffer_size}, got {self.c}")
        if self.staleness_exponent < 0:
            raise ConfigError("staleness exponent must be >= 0")

    @property
    def mode(self) -> RunMode:
        return RunMode.of(self.strategy)


class OuterOptimizer:
    """θ (the global parameters), m and Δ as CPU float32 tensors; subclasses define ``_apply``."""

    def __init__(self, params: dict[str, torch.Tensor], config: OuterConfig) -> None:
        self.config = config
        self.params = {n: p.detach().to("cpu", torch.float32).clone() for n, p in params.items()}
        self.momentum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.accum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.pending = 0  # arrivals in Δ since the buffer was last emptied (t mod N)
        self.arrivals = 0  # all arrivals ever applied
        self.theta_updates = 0  # times θ changed: a new snapshot version is due only then

    def step(self, delta: dict[str, torch.Tensor], *, active_clients: int = 1, staleness: int = 0) -> bool:
        """Apply one pseudo-gradient; return True if this arrival emptied the buffer.

        ``delta`` must have exactly the parameters' names and shapes (the intake checks that).
        """
        n = self.config.buffer_size or max(self.config.min_buffer, active_clients)
        a = self.config.staleness_exponent
        if a and staleness > 0:
            weight = (1.0 + staleness) ** -a
            delta = {name: g * weight for name, g in delta.items()}
        self.pending += 1
        self.arrivals += 1
        emptied = self._apply(delta, n)
        if self.moves_theta_on_arrival or emptied:
            self.theta_updates += 1
        return emptied

    def adopt(self, delta: dict[str, torch.Tensor]) -> None:
        """Warm start: ``θ -= g`` (θ becomes the sender's local model); momentum and buffer untouched."""
        for name, g in delta.items():
            self.params[name].sub_(g)
        self.theta_updates += 1

    # True where every arrival moves θ (dn, nesterov, sgd); buffered strategies say so themselves.
    moves_theta_on_arrival = True

    def _apply(self, delta: dict[str, torch.Tensor], n: int) -> bool:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """All state tensors, prefixed, for a checkpoint."""
        out: dict[str, torch.Tensor] = {}
        for prefix, group in (("param/", self.params), ("momentum/", self.momentum),
                              ("accum/", self.accum)):
            out.update({prefix + n: t for n, t in group.items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, pending: int, arrivals: int) -> None:
        for prefix, group in (("param/", self.params), ("momentum/", self.momentum),
                              ("accum/", self.accum)):
            for name in group:
                key = prefix + name
                if key not in tensors or tensors[key].shape != group[name].shape:
                    raise ConfigError(f"checkpoint does not match the model: {key}")
                group[name] = tensors[key].to(torch.float32).clone()
        self.pending = pending
        self.arrivals = arrivals


class DelayedNesterov(OuterOptimizer):
    def _apply(self, delta: dict[str, torch.Tensor], n: int) -> bool:
        eps, beta = self.config.lr, self.config.momentum
        for name, g in delta.items():
            self.accum[name].add_(g)
        c = min(self.config.c, 1.0 / n)  # Algorithm 3 allows c in [0, 1/N]; N may change (active clients)
        if self.pending >= n:
            # Δ / pending is the mean of the buffered deltas (= Δ/N when N is fixed).
            share = (1.0 - c * n + c) * beta  # the momentum not already spread over the cycle by c
            for name, g in delta.items():
                m = self.momentum[name]
                m.mul_(beta).add_(self.accum[name], alpha=1.0 / self.pending)
                self.params[name].sub_(eps * (share * m + g / n))
                self.accum[name].zero_()
            self.pending = 0
            return True
        cb = c * beta
        for name, g in delta.items():
            update = g / n
            if cb:
                update = update + cb * self.momentum[name]
            self.params[name].sub_(eps * update)
        return False


class PerArrivalNesterov(OuterOptimizer):
    def _apply(self, delta: dict[str, torch.Tensor], n: int) -> bool:
        eps, beta = self.config.lr, self.config.momentum
        for name, g in delta.items():
            m = self.momentum[name]
            m.mul_(beta).add_(g, alpha=1.0 / n)
            self.params[name].sub_(eps * (beta * m + g / n))
        self.pending = 0
        return True


class OuterSGD(OuterOptimizer):
    def _apply(self, delta: dict[str, torch.Tensor], n: int) -> bool:
        for name, g in delta.items():
            self.params[name].sub_(g, alpha=self.config.lr / n)
        self.pending = 0
        return True


class SyncNesterov(OuterOptimizer):
    """Synchronous DiLoCo: buffer the round's deltas; :meth:`complete_round` takes the step."""

    moves_theta_on_arrival = False

    def _apply(self, delta: dict[str, torch.Tensor], n: int) -> bool:
        for name, g in delta.items():
            self.accum[name].add_(g)
        return False

    def complete_round(self) -> bool:
        """One Nesterov step on the mean of the buffered deltas; False if none were buffered."""
        if not self.pending:
            return False
        eps, beta = self.config.lr, self.config.momentum
        for name, total in self.accum.items():
            mean = total / self.pending
            m = self.momentum[name]
            m.mul_(beta).add_(mean)
            self.params[name].sub_(eps * (beta * m + mean))
            total.zero_()
        self.pending = 0
        self.theta_updates += 1
        return True


class FedBuff(OuterOptimizer):
    moves_theta_on_arrival = False

    def _apply(self, delta: dict[str, torch.Tensor], n: int) -> bool:
        for name, g in delta.items():
            self.accum[name].add_(g)
        if self.pending < n:
            return False
        for name in delta:
            self.params[name].sub_(self.accum[name], alpha=self.config.lr / self.pending)
            self.accum[name].zero_()
        self.pending = 0
        return True


_CLASSES: dict[str, type[OuterOptimizer]] = {
    "dn": DelayedNesterov, "nesterov": PerArrivalNesterov, "sgd": OuterSGD, "fedbuff": FedBuff,
    "sync": SyncNesterov,
}


def make_outer_optimizer(params: dict[str, torch.Tensor], config: OuterConfig) -> OuterOptimizer:
    """The outer optimizer that ``config.strategy`` names."""
    return _CLASSES[config.strategy](params, config)
