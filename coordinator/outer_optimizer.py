"""Outer optimizers of asynchronous Local-SGD: how arriving pseudo-gradients move θ.

``dn`` — Delayed Nesterov (Liu et al., 2024, Algorithm 3). On each arriving ``g``
(``N`` = buffer size, ``c`` ∈ [0, 1/N], 0 by default)::

    Δ += g;  t += 1
    if t % N == 0:  m = β·m + Δ/N;  θ -= ε·((1 − c·N + c)·β·m + g/N);  Δ = 0   # momentum once per N
    else:           θ -= ε·(c·β·m + g/N)                                       # plain step, m frozen

Over N arrivals the momentum term weighs (N − 1)·c + (1 − c·N + c) = 1 in all: the cycle moves θ by
one Nesterov step on the mean of the N deltas, exactly with c = 0, and with c > 0 up to
ε·c·(N − 1)·β·(m_before − m_after) (c spreads part of the momentum step over the cycle, using the
momentum of the cycle before).

``edn`` — eager ("front-loaded") Delayed Nesterov, the default: the same cycle as ``dn`` with c = 0, but the
momentum step's known part moves θ at the cycle's first arrival instead of its last::

    if the cycle is new:  θ -= ε·β²·m                   # the momentum part of the coming step
    Δ += g;  θ -= ε·(1 + β)·g/N                          # every arrival: its share of the step
    if t % N == 0:        m = β·m + Δ/N;  Δ = 0          # m only: θ already holds the step

A cycle still moves θ by exactly one Nesterov step on the mean of its N deltas (β·m' + ḡ with
m' = β·m + ḡ is β²·m + (1 + β)·ḡ), but a worker that starts its next round right after its own
arrival starts from a θ that already holds the cycle's momentum, as in sync DiLoCo; with ``dn``
only the cycle's last worker does.

``nesterov`` — Nesterov on every arrival (the paper's "Async DiLoCo"): ``m = β·m + g/N;
θ -= ε·(β·m + g/N)``. It over-counts momentum (about 7% worse perplexity in the paper).

``sgd`` — no outer momentum: ``θ -= ε·g/N``.

``fedbuff`` — buffer N arrivals, then ``θ -= ε·mean(buffer)`` (FedBuff, Nguyen et al., 2022).

``sync`` — synchronous DiLoCo: deltas of one round are only buffered; when the round's barrier
completes (:meth:`SyncNesterov.complete_round`), one Nesterov step on their mean.

Every strategy may discount a stale delta by ``(1 + staleness)^-a`` (``staleness_exponent`` a;
0 = off); deltas beyond the staleness cut-off never get here (the intake discards them).

Compute weights (``compute_exponent`` p; 0 = off). Under Dynamic Local Updates a slow client's
round is short, and its delta carries that much less progress; counted as one of N equal
arrivals it dilutes the step. With p > 0 a delta of H_i local steps (the plan's full round is H)
weighs w = (H_i/H)^p: it moves θ by w·g/W instead of g/N, where W (the buffer, in weight units) is
the sum of the active clients' weights, and a cycle ends when the weights of its arrivals reach W.
The cycle's step is then on the weighted mean Σ w·g / Σ w. With every w = 1 this is exactly the
unweighted rule above.

A weight cap (``weight_cap`` r; 0 = off). Compute weights make the fastest volunteer the
heaviest: one faster than all the others together holds over half of every step, and its lies
then outweigh everyone's truth (docs/SECURITY.md). With r > 0 and at least ``CAP_MIN_CLIENTS``
active, each client's weight is at most r times the other active clients' together (r = 0.5: no
one holds more than a third of W), in its arrivals and in W alike. Off by default: in real runs it
did not stop a fast sign-flipper the guard let in, and from scratch it cost the volunteers their
lead over the fastest alone in the simulator (docs/SECURITY.md, docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from coordinator.run_mode import RunMode
from shared.errors import ConfigError


class Scaled(Mapping[str, torch.Tensor]):
    """``{name: scale · tensor}``, each tensor scaled when it is looked up, so no whole-model copy
    is ever made: the guard reads its centre ``(1 − β)·m`` this way (a model's size of memory less
    at the peak of every judgement: docs/BENCHMARKS.md, coordinator_memory.py), and a step takes a
    discounted or weighted delta this way."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], scale: float) -> None:
        self.tensors, self.scale = tensors, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name] * self.scale

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


# The weight cap applies from this many active clients (with two, each would be held to a share
# of the other's weight, and an honest pair would slow down for nothing).
CAP_MIN_CLIENTS = 3

ASYNC_STRATEGIES = ("dn", "edn", "nesterov", "sgd", "fedbuff")
STRATEGIES = (*ASYNC_STRATEGIES, "sync")


@dataclass(frozen=True)
class OuterConfig:
    """Outer optimizer settings. The defaults are the measured best (docs/BENCHMARKS.md, "Per-update
    parity"): eager Delayed Nesterov with compute weights p = 1, ε = 0.5, β = 0.8. DiLoCo's own
    ε = 0.7, β = 0.9 (tuned for H = 50-500 from a pretrained model) swung and ended worse in every
    run we made with small H from scratch (the demo: 2.242 against 1.705).

    ``buffer_size`` N = 0 means "the number of active clients, at least ``min_buffer``", re-read at
    every arrival: with ``min_buffer`` above 1, the run's very first deltas (one client heard from
    so far) do not each take a full momentum step. ``c`` must be at most 1/N (with N from active
    clients, it is capped at 1/N at each arrival). If eval
    loss oscillates (small H, few clients, from scratch), lower ``momentum`` and ``lr`` further;
    if it falls too slowly with many clients, raise ``buffer_size`` rather than ``lr``.
    If slow clients' stale deltas hurt, set ``staleness_exponent`` to 0.5. ``compute_exponent`` p
    weighs a delta of H_i local steps by (H_i/H)^p (module docstring); 0 counts every delta alike.
    ``weight_cap`` r holds each client's weight to r times the other active clients' (0 = off).
    """

    strategy: str = "edn"
    lr: float = 0.5
    momentum: float = 0.8
    buffer_size: int = 0
    min_buffer: int = 1
    c: float = 0.0
    staleness_exponent: float = 0.0
    compute_exponent: float = 1.0
    weight_cap: float = 0.0

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
        if self.c and self.strategy != "dn":
            raise ConfigError(f"c applies to strategy dn only, not {self.strategy!r}")
        if not 0 <= self.compute_exponent <= 4:
            raise ConfigError("compute exponent must be in [0, 4]")
        if self.weight_cap < 0:
            raise ConfigError("weight cap must be >= 0 (0 = off)")

    def weight_of(self, local_steps: int, full_steps: int) -> float:
        """A delta's compute weight (H_i/H)^p, H_i capped at the full round H (never above 1)."""
        if not self.compute_exponent or full_steps <= 0:
            return 1.0
        return (max(1, min(local_steps, full_steps)) / full_steps) ** self.compute_exponent

    def weights_of(self, rounds: Sequence[int], full_steps: int) -> list[float]:
        """The active clients' compute weights from their rounds' local steps (0: none applied
        yet, counted as a full round), each held to the cap (:meth:`capped`)."""
        return self.capped([self.weight_of(steps or full_steps, full_steps) for steps in rounds])

    def capped(self, weights: Sequence[float]) -> list[float]:
        """The active clients' compute weights with the cap: each at most ``weight_cap`` times the
        sum of the others' (as given), once ``CAP_MIN_CLIENTS`` are active."""
        if not self.weight_cap or len(weights) < CAP_MIN_CLIENTS:
            return list(weights)
        total = sum(weights)
        return [min(w, self.weight_cap * (total - w)) for w in weights]

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
        self.filled = 0.0  # their compute weights (= pending when every weight is 1)
        self.arrivals = 0  # all arrivals ever applied
        self.theta_updates = 0  # times θ changed: a new snapshot version is due only then

    def step(self, delta: Mapping[str, torch.Tensor], *, active_clients: int = 1, staleness: int = 0,
             weight: float = 1.0, active_weight: float | None = None) -> bool:
        """Apply one pseudo-gradient; return True if this arrival emptied the buffer.

        ``delta`` must have exactly the parameters' names and shapes (the intake checks that).
        ``weight`` is its compute weight (:meth:`OuterConfig.weight_of`), ``active_weight`` the sum
        of the active clients' weights, this sender's included (None: every client weighs 1).
        """
        n = self.buffer_weight(active_clients, active_weight)
        a = self.config.staleness_exponent
        factor = weight * ((1.0 + staleness) ** -a if a and staleness > 0 else 1.0)
        if factor != 1.0:  # scaled tensor by tensor as the step reads it: no copy of the delta
            delta = Scaled(delta, factor)
        self.pending += 1
        self.filled += weight
        self.arrivals += 1
        emptied = self._apply(delta, n)
        if self.moves_theta_on_arrival or emptied:
            self.theta_updates += 1
        return emptied

    def buffer_weight(self, active_clients: int, active_weight: float | None) -> float:
        """N in weight units: the fixed buffer size, else the active clients' weights, with each
        client short of ``min_buffer`` counted as one full round."""
        if self.config.buffer_size:
            return float(self.config.buffer_size)
        if active_weight is None:
            return float(max(self.config.min_buffer, active_clients))
        return active_weight + max(0, self.config.min_buffer - active_clients)

    def _cycle_done(self, n: float) -> bool:
        return self.filled >= n - 1e-9

    def _end_cycle(self) -> None:
        self.pending = 0
        self.filled = 0.0

    def adopt(self, delta: dict[str, torch.Tensor]) -> None:
        """Warm start: ``θ -= g`` (θ becomes the sender's local model); momentum and buffer untouched."""
        for name, g in delta.items():
            self.params[name].sub_(g)
        self.theta_updates += 1

    # True where every arrival moves θ (dn, nesterov, sgd); buffered strategies say so themselves.
    moves_theta_on_arrival = True

    def arrival_share(self, n: float) -> float:
        """The share of a full-weight delta θ moves by when it arrives, buffer weight ``n``
        (RoundPlan.arrival_share): ε/N for dn and outer SGD; 0 where θ waits for a buffer."""
        return self.config.lr / n if self.moves_theta_on_arrival and n > 0 else 0.0

    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """All state tensors, prefixed, for a checkpoint."""
        out: dict[str, torch.Tensor] = {}
        for prefix, group in (("param/", self.params), ("momentum/", self.momentum),
                              ("accum/", self.accum)):
            out.update({prefix + n: t for n, t in group.items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, pending: int, arrivals: int,
                     filled: float | None = None) -> None:
        for prefix, group in (("param/", self.params), ("momentum/", self.momentum),
                              ("accum/", self.accum)):
            for name in group:
                key = prefix + name
                if key not in tensors or tensors[key].shape != group[name].shape:
                    raise ConfigError(f"checkpoint does not match the model: {key}")
                group[name].copy_(tensors[key])  # in place: whatever shares θ's storage sees it
        self.pending = pending
        self.filled = float(pending if filled is None else filled)  # older checkpoints: weights of 1
        self.arrivals = arrivals


class DelayedNesterov(OuterOptimizer):
    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        eps, beta = self.config.lr, self.config.momentum
        for name, g in delta.items():
            self.accum[name].add_(g)
        c = min(self.config.c, 1.0 / n)  # Algorithm 3 allows c in [0, 1/N]; N may change (active clients)
        if self._cycle_done(n):
            # Δ / filled is the (weighted) mean of the buffered deltas (= Δ/N when N is fixed).
            share = (1.0 - c * n + c) * beta  # the momentum not already spread over the cycle by c
            for name, g in delta.items():
                m = self.momentum[name]
                m.mul_(beta).add_(self.accum[name], alpha=1.0 / self.filled)
                self.params[name].sub_(eps * (share * m + g / n))
                self.accum[name].zero_()
            self._end_cycle()
            return True
        cb = c * beta
        for name, g in delta.items():
            update = g / n
            if cb:
                update = update + cb * self.momentum[name]
            self.params[name].sub_(eps * update)
        return False


class EagerDelayedNesterov(OuterOptimizer):
    """``edn``: the momentum part of a cycle's step at its first arrival (module docstring)."""

    def arrival_share(self, n: float) -> float:
        return self.config.lr * (1.0 + self.config.momentum) / n if n > 0 else 0.0

    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        eps, beta = self.config.lr, self.config.momentum
        first = self.pending == 1
        for name, g in delta.items():
            if first:
                self.params[name].sub_(self.momentum[name], alpha=eps * beta * beta)
            self.accum[name].add_(g)
            self.params[name].sub_(g, alpha=eps * (1.0 + beta) / n)
        if not self._cycle_done(n):
            return False
        for name, total in self.accum.items():
            self.momentum[name].mul_(beta).add_(total, alpha=1.0 / self.filled)
            total.zero_()
        self._end_cycle()
        return True


class PerArrivalNesterov(OuterOptimizer):
    def arrival_share(self, n: float) -> float:
        return self.config.lr * (1.0 + self.config.momentum) / n if n > 0 else 0.0

    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        eps, beta = self.config.lr, self.config.momentum
        for name, g in delta.items():
            m = self.momentum[name]
            m.mul_(beta).add_(g, alpha=1.0 / n)
            self.params[name].sub_(eps * (beta * m + g / n))
        self._end_cycle()
        return True


class OuterSGD(OuterOptimizer):
    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        for name, g in delta.items():
            self.params[name].sub_(g, alpha=self.config.lr / n)
        self._end_cycle()
        return True


class SyncNesterov(OuterOptimizer):
    """Synchronous DiLoCo: buffer the round's deltas; :meth:`complete_round` takes the step."""

    moves_theta_on_arrival = False

    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        for name, g in delta.items():
            self.accum[name].add_(g)
        return False

    def complete_round(self) -> bool:
        """One Nesterov step on the mean of the buffered deltas; False if none were buffered."""
        if not self.pending:
            return False
        eps, beta = self.config.lr, self.config.momentum
        for name, total in self.accum.items():
            mean = total / self.filled
            m = self.momentum[name]
            m.mul_(beta).add_(mean)
            self.params[name].sub_(eps * (beta * m + mean))
            total.zero_()
        self._end_cycle()
        self.theta_updates += 1
        return True


class FedBuff(OuterOptimizer):
    moves_theta_on_arrival = False

    def _apply(self, delta: Mapping[str, torch.Tensor], n: float) -> bool:
        for name, g in delta.items():
            self.accum[name].add_(g)
        if not self._cycle_done(n):
            return False
        for name in delta:
            self.params[name].sub_(self.accum[name], alpha=self.config.lr / self.filled)
            self.accum[name].zero_()
        self._end_cycle()
        return True


_CLASSES: dict[str, type[OuterOptimizer]] = {
    "dn": DelayedNesterov, "edn": EagerDelayedNesterov, "nesterov": PerArrivalNesterov, "sgd": OuterSGD,
    "fedbuff": FedBuff, "sync": SyncNesterov,
}


def make_outer_optimizer(params: dict[str, torch.Tensor], config: OuterConfig) -> OuterOptimizer:
    """The outer optimizer that ``config.strategy`` names."""
    return _CLASSES[config.strategy](params, config)
