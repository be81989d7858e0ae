"""Delayed Nesterov against hand-computed references."""

from __future__ import annotations

import pytest
import torch

from coordinator.outer_optimizer import DelayedNesterov, OuterConfig, make_outer_optimizer
from shared.errors import ConfigError


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([0.5])}


def _grads(k: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(k)
    return [{"w": torch.randn(3, generator=gen), "b": torch.randn(1, generator=gen)} for _ in range(k)]


def test_n_arrivals_equal_one_nesterov_step_on_their_mean() -> None:
    n, eps, beta = 4, 0.7, 0.9
    opt = DelayedNesterov(_params(), OuterConfig(lr=eps, momentum=beta, buffer_size=n))
    rounds = [_grads(n), _grads(n + 1)[:n]]
    theta = _params()
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    for grads in rounds:
        moved = [opt.step(g) for g in grads]
        assert moved == [False] * (n - 1) + [True]
        for name in theta:
            mean = sum(g[name] for g in grads) / n
            m[name] = beta * m[name] + mean
            theta[name] = theta[name] - eps * (mean + beta * m[name])  # Nesterov on the mean
            torch.testing.assert_close(opt.params[name], theta[name])
            torch.testing.assert_close(opt.momentum[name], m[name])


def test_between_momentum_updates_steps_are_plain_and_momentum_frozen() -> None:
    opt = DelayedNesterov(_params(), OuterConfig(lr=0.5, momentum=0.9, buffer_size=3))
    g1, g2, g3, g4 = _grads(4)
    for g in (g1, g2, g3):
        opt.step(g)
    m_after = {k: v.clone() for k, v in opt.momentum.items()}
    before = {k: v.clone() for k, v in opt.params.items()}
    assert opt.step(g4) is False
    for name in before:
        torch.testing.assert_close(opt.params[name], before[name] - 0.5 * g4[name] / 3)
        torch.testing.assert_close(opt.momentum[name], m_after[name])


def test_c_adds_a_share_of_frozen_momentum() -> None:
    opt = DelayedNesterov(_params(), OuterConfig(strategy="dn", lr=1.0, momentum=0.5, buffer_size=2, c=0.5))
    g1, g2, g3 = _grads(3)
    opt.step(g1)
    opt.step(g2)  # momentum moves here
    m = {k: v.clone() for k, v in opt.momentum.items()}
    before = {k: v.clone() for k, v in opt.params.items()}
    opt.step(g3)
    for name in before:  # θ -= ε(c·β·m + g/N)
        torch.testing.assert_close(opt.params[name], before[name] - (0.25 * m[name] + g3[name] / 2))


@pytest.mark.parametrize("c", [0.0, 0.1, 0.25])
def test_a_cycle_of_n_arrivals_with_any_c_is_one_nesterov_step_on_their_mean(c: float) -> None:
    """Algorithm 3: the momentum term weighs (N − 1)·c + (1 − c·N + c) = 1 over a cycle; the only
    difference from one Nesterov step is that c·(N − 1) of it uses the cycle-old momentum."""
    n, eps, beta = 4, 0.5, 0.8
    opt = DelayedNesterov(_params(), OuterConfig(strategy="dn", lr=eps, momentum=beta, buffer_size=n, c=c))
    for g in _grads(n):  # one cycle first, so that the momentum is not zero
        opt.step(g)
    before = {k: v.clone() for k, v in opt.params.items()}
    m_before = {k: v.clone() for k, v in opt.momentum.items()}
    grads = _grads(n + 1)[1:]
    for g in grads:
        opt.step(g)
    for name in before:
        mean = sum(g[name] for g in grads) / n
        m_after = beta * m_before[name] + mean
        torch.testing.assert_close(opt.momentum[name], m_after)
        nesterov = eps * (beta * m_after + mean)
        drift = eps * c * (n - 1) * beta * (m_before[name] - m_after)
        torch.testing.assert_close(before[name] - opt.params[name], nesterov + drift)


def test_with_a_steady_pseudo_gradient_c_no_longer_over_counts_momentum() -> None:
    """The review's case: constant g = 1, N = 4, ε 0.5, β 0.8, 400 arrivals. Dropping (1 − cN + c)
    gave θ = −384 at c = 0.25; Algorithm 3 stays within a few steps of c = 0 (−242)."""
    finals = {}
    for c in (0.0, 0.25):
        config = OuterConfig(strategy="dn", lr=0.5, momentum=0.8, buffer_size=4, c=c)
        opt = DelayedNesterov({"w": torch.zeros(1)}, config)
        for _ in range(400):
            opt.step({"w": torch.ones(1)})
        finals[c] = float(opt.params["w"])
    assert finals[0.0] == pytest.approx(-242.0, abs=0.01)
    assert finals[0.25] == pytest.approx(-240.5, abs=0.01)


def test_c_beyond_one_over_n_is_refused_or_capped() -> None:
    with pytest.raises(ConfigError, match="at most 1/N"):
        OuterConfig(strategy="dn", buffer_size=4, c=0.5)
    # N from active clients: c is capped at 1/N at each arrival (here N = 2, so c = 0.5)
    capped = DelayedNesterov(_params(), OuterConfig(strategy="dn", lr=1.0, momentum=0.5, c=1.0))
    exact = DelayedNesterov(_params(), OuterConfig(strategy="dn", lr=1.0, momentum=0.5, buffer_size=2,
                                                   c=0.5))
    for g in _grads(5):
        capped.step(g, active_clients=2)
        exact.step(g)
    for name in exact.params:
        torch.testing.assert_close(capped.params[name], exact.params[name])


def test_min_buffer_floors_n_while_few_clients_were_heard_from() -> None:
    """The run's first delta (one active client) must not take a whole momentum step alone."""
    floored = DelayedNesterov(_params(), OuterConfig(lr=0.7, momentum=0.9, buffer_size=0, min_buffer=3))
    g1, g2, g3 = _grads(3)
    assert floored.step(g1, active_clients=1) is False  # N = 3: buffered, momentum untouched
    assert all(float(m.abs().sum()) == 0 for m in floored.momentum.values())
    for name, p in _params().items():  # a plain step of g/N
        torch.testing.assert_close(floored.params[name], p - 0.7 * g1[name] / 3)
    assert floored.step(g2, active_clients=2) is False
    assert floored.step(g3, active_clients=2) is True  # the third arrival fills the floor of 3
    with pytest.raises(ConfigError):
        OuterConfig(min_buffer=0)


def test_buffer_size_zero_follows_active_clients() -> None:
    opt = DelayedNesterov(_params(), OuterConfig(lr=0.7, momentum=0.9, buffer_size=0))
    g1, g2 = _grads(2)
    assert opt.step(g1, active_clients=2) is False
    assert opt.step(g2, active_clients=2) is True


def test_state_round_trips_through_tensors() -> None:
    opt = DelayedNesterov(_params(), OuterConfig(buffer_size=3))
    for g in _grads(4):
        opt.step(g)
    clone = DelayedNesterov(_params(), OuterConfig(buffer_size=3))
    clone.load_tensors(opt.tensors(), pending=opt.pending, arrivals=opt.arrivals)
    g = _grads(5)[4]
    assert opt.step(g) == clone.step(g)
    for name in opt.params:
        torch.testing.assert_close(opt.params[name], clone.params[name])


def test_load_tensors_refuses_a_checkpoint_of_another_model() -> None:
    opt = DelayedNesterov(_params(), OuterConfig())
    tensors = opt.tensors()
    tensors["param/w"] = torch.zeros(5)
    with pytest.raises(ConfigError):
        DelayedNesterov(_params(), OuterConfig()).load_tensors(tensors, pending=0, arrivals=0)


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0}, {"momentum": 1.0}, {"buffer_size": -1}, {"c": 2}, {"staleness_exponent": -1}]
)
def test_invalid_config_is_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        OuterConfig(**kwargs)


def test_per_arrival_nesterov_moves_momentum_every_time() -> None:
    eps, beta, n = 0.7, 0.9, 2
    opt = make_outer_optimizer(_params(), OuterConfig(strategy="nesterov", lr=eps, momentum=beta,
                                                      buffer_size=n))
    theta, m = _params(), {k: torch.zeros_like(v) for k, v in _params().items()}
    for g in _grads(3):
        assert opt.step(g) is True
        for name in theta:
            m[name] = beta * m[name] + g[name] / n
            theta[name] = theta[name] - eps * (beta * m[name] + g[name] / n)
            torch.testing.assert_close(opt.params[name], theta[name])


def test_sgd_has_no_memory() -> None:
    opt = make_outer_optimizer(_params(), OuterConfig(strategy="sgd", lr=0.5, buffer_size=4))
    g = _grads(1)[0]
    opt.step(g)
    for name, p in _params().items():
        torch.testing.assert_close(opt.params[name], p - 0.5 * g[name] / 4)


def test_fedbuff_applies_the_mean_once_the_buffer_is_full() -> None:
    opt = make_outer_optimizer(_params(), OuterConfig(strategy="fedbuff", lr=0.8, buffer_size=3))
    grads = _grads(3)
    assert [opt.step(g) for g in grads[:2]] == [False, False]
    for name, p in _params().items():  # nothing moves until the buffer is full
        torch.testing.assert_close(opt.params[name], p)
    assert opt.step(grads[2]) is True
    for name, p in _params().items():
        mean = sum(g[name] for g in grads) / 3
        torch.testing.assert_close(opt.params[name], p - 0.8 * mean)


def test_staleness_discount_scales_a_stale_delta() -> None:
    config = OuterConfig(strategy="sgd", lr=1.0, buffer_size=1, staleness_exponent=0.5)
    fresh, stale = make_outer_optimizer(_params(), config), make_outer_optimizer(_params(), config)
    g = _grads(1)[0]
    fresh.step(g, staleness=0)
    stale.step(g, staleness=3)  # weight (1 + 3)^-0.5 = 1/2
    for name, p in _params().items():
        torch.testing.assert_close(p - stale.params[name], 0.5 * (p - fresh.params[name]))


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown outer strategy"):
        OuterConfig(strategy="adam")


def test_sync_buffers_until_the_round_completes_then_takes_one_nesterov_step() -> None:
    eps, beta = 0.7, 0.9
    sync = make_outer_optimizer(_params(), OuterConfig(strategy="sync", lr=eps, momentum=beta))
    dn = make_outer_optimizer(_params(), OuterConfig(strategy="dn", lr=eps, momentum=beta, buffer_size=3))
    grads = _grads(3)
    for g in grads:
        assert sync.step(g, active_clients=3) is False
        dn.step(g)
    for name, p in _params().items():  # θ untouched before the barrier
        torch.testing.assert_close(sync.params[name], p)
    assert sync.theta_updates == 0
    assert sync.complete_round() is True and sync.theta_updates == 1
    for name in dn.params:  # same step as N = 3 Delayed Nesterov arrivals
        torch.testing.assert_close(sync.params[name], dn.params[name])
    assert sync.complete_round() is False  # an empty round changes nothing


def test_theta_updates_count_only_changes_of_theta() -> None:
    fedbuff = make_outer_optimizer(_params(), OuterConfig(strategy="fedbuff", buffer_size=2))
    dn = make_outer_optimizer(_params(), OuterConfig(strategy="dn", buffer_size=2))
    for g in _grads(3):
        fedbuff.step(g)
        dn.step(g)
    assert (fedbuff.theta_updates, dn.theta_updates) == (1, 3)


def _nesterov_reference(rounds: list[list[dict[str, torch.Tensor]]], eps: float, beta: float,
                        weights: list[list[float]] | None = None) -> tuple[dict, dict]:
    """θ and m after one sync Nesterov step per round on the (weighted) mean of its deltas."""
    theta = _params()
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    for r, grads in enumerate(rounds):
        w = weights[r] if weights else [1.0] * len(grads)
        for name in theta:
            mean = sum(wi * g[name] for wi, g in zip(w, grads, strict=True)) / sum(w)
            m[name] = beta * m[name] + mean
            theta[name] = theta[name] - eps * (beta * m[name] + mean)
    return theta, m


def test_eager_dn_cycle_is_one_nesterov_step_on_the_mean() -> None:
    n, eps, beta = 4, 0.5, 0.8
    opt = make_outer_optimizer(_params(), OuterConfig(strategy="edn", lr=eps, momentum=beta, buffer_size=n))
    rounds = [_grads(n), _grads(n + 1)[1:], _grads(n + 2)[2:]]
    for r, grads in enumerate(rounds):
        assert [opt.step(g) for g in grads] == [False] * (n - 1) + [True]
        theta, m = _nesterov_reference(rounds[: r + 1], eps, beta)
        for name in theta:
            torch.testing.assert_close(opt.params[name], theta[name])
            torch.testing.assert_close(opt.momentum[name], m[name])


def test_eager_dn_moves_the_known_momentum_at_the_first_arrival_of_a_cycle() -> None:
    """What sets it apart from dn: the next worker starts from a θ that holds the momentum."""
    n, eps, beta = 2, 0.5, 0.8
    opt = make_outer_optimizer(_params(), OuterConfig(strategy="edn", lr=eps, momentum=beta, buffer_size=n))
    for g in _grads(n):
        opt.step(g)
    m = {k: v.clone() for k, v in opt.momentum.items()}
    before = {k: v.clone() for k, v in opt.params.items()}
    g = _grads(3)[2]
    assert opt.step(g) is False
    for name in before:
        expected = before[name] - eps * (beta * beta * m[name] + (1 + beta) * g[name] / n)
        torch.testing.assert_close(opt.params[name], expected)
        torch.testing.assert_close(opt.momentum[name], m[name])  # m moves at the cycle's end only


@pytest.mark.parametrize("strategy", ["dn", "edn"])
def test_compute_weighted_cycle_is_one_nesterov_step_on_the_weighted_mean(strategy: str) -> None:
    """DyLU rounds of H, H/2, H/4, H/8 steps with p = 1: weights 1, ½, ¼, ⅛ fill a buffer of
    W = 1.875; the cycle's step is on Σ w·g / Σ w, not on the plain mean."""
    eps, beta = 0.5, 0.8
    config = OuterConfig(strategy=strategy, lr=eps, momentum=beta, compute_exponent=1.0)
    steps = [40, 20, 10, 5]
    weights = [config.weight_of(h, 40) for h in steps]
    assert weights == [1.0, 0.5, 0.25, 0.125]
    opt = make_outer_optimizer(_params(), config)
    rounds = [_grads(4), _grads(5)[1:]]
    for grads in rounds:
        done = [opt.step(g, active_clients=4, weight=w, active_weight=sum(weights))
                for g, w in zip(grads, weights, strict=True)]
        assert done == [False, False, False, True]
    theta, m = _nesterov_reference(rounds, eps, beta, [weights, weights])
    for name in theta:
        torch.testing.assert_close(opt.momentum[name], m[name])
        torch.testing.assert_close(opt.params[name], theta[name])


def test_compute_weight_is_capped_at_a_full_round_and_off_when_p_is_zero() -> None:
    assert OuterConfig(compute_exponent=0.0).weight_of(5, 40) == 1.0
    config = OuterConfig(compute_exponent=0.5)
    assert config.weight_of(10, 40) == pytest.approx(0.5)
    assert config.weight_of(400, 40) == 1.0  # a claim beyond the plan weighs no more than a round
    with pytest.raises(ConfigError):
        OuterConfig(strategy="edn", c=0.1)
    with pytest.raises(ConfigError):
        OuterConfig(compute_exponent=-1)


@pytest.mark.parametrize("strategy", ["dn", "edn", "fedbuff", "sync"])
def test_a_stale_short_round_is_scaled_by_both_factors_and_leaves_the_delta_as_it_was(strategy: str) -> None:
    """The staleness discount and the compute weight scale the delta as the step reads it
    (``Scaled``): the same as scaling it by hand first, and the caller's tensors stay as they were."""
    config = OuterConfig(strategy=strategy, lr=0.5, momentum=0.8, buffer_size=2, staleness_exponent=0.5)
    by_hand = OuterConfig(strategy=strategy, lr=0.5, momentum=0.8, buffer_size=2)
    scaled, reference = make_outer_optimizer(_params(), config), make_outer_optimizer(_params(), by_hand)
    for g in _grads(4):  # four arrivals of weight ½ fill the buffer of 2 once
        kept = {name: t.clone() for name, t in g.items()}
        scaled.step(g, staleness=3, weight=0.5)  # discount (1 + 3)^-0.5 = ½, then the weight ½
        reference.step({name: t * 0.5 for name, t in g.items()}, staleness=3, weight=0.5)
        assert all(torch.equal(g[name], kept[name]) for name in g)
    for name in scaled.params:
        torch.testing.assert_close(scaled.params[name], reference.params[name])
        torch.testing.assert_close(scaled.accum[name], reference.accum[name])
        torch.testing.assert_close(scaled.momentum[name], reference.momentum[name])
    assert scaled.filled == reference.filled
