"""The delta guard: screening against recent accepted deltas, centered clipping, its persistence,
and its place in the intake (a refused delta leaves θ untouched, with its reason counted)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import pytest
import torch

from coordinator.guard import DeltaGuard, GuardConfig, momentum_centre
from coordinator.outer_optimizer import OuterConfig, make_outer_optimizer
from shared.codecs import get_codec
from shared.errors import ConfigError
from shared.protocol import DeltaMessage
from tests.unit.test_intake import RUN_ID, make_intake

NAMES = ["w", "b"]
H = 20


def _delta(scale: float = 1.0, *, seed: int = 0, b_share: float = 0.1) -> dict[str, torch.Tensor]:
    """A made-up delta of norm ~``scale``: most of it in ``w``, ``b_share`` of it in ``b``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(100, generator=gen)
    b = torch.randn(10, generator=gen)
    w = w / w.norm() * scale * math.sqrt(1 - b_share**2)
    b = b / b.norm() * scale * b_share
    return {"w": w, "b": b}


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.norm()) ** 2 for t in delta.values()))


def _guard(mode: str = "clip", centre: dict[str, torch.Tensor] | None = None, **kwargs: object) -> DeltaGuard:
    config = GuardConfig(mode=mode, **kwargs)  # type: ignore[arg-type]
    return DeltaGuard(config, NAMES, centre=lambda: centre, full_steps=H)


def _warm(guard: DeltaGuard, count: int = 8, centre: dict[str, torch.Tensor] | None = None) -> None:
    """Honest deltas: norms 1.0-1.35 (around ``centre`` when there is one)."""
    for seed in range(count):
        delta = _delta(1.0 + 0.05 * seed, seed=seed)
        if centre is not None:
            delta = {n: centre[n] + 0.3 * t for n, t in delta.items()}
        assert not guard.judge(delta, local_steps=H).refused


def test_off_passes_everything_and_counts_nothing() -> None:
    guard = _guard("off")
    huge = _delta(1e6)
    decision = guard.judge(huge, local_steps=H)
    assert decision.delta is huge and not guard.counts


def test_an_outlier_norm_is_refused_once_there_is_a_history() -> None:
    guard = _guard("screen")
    assert not guard.judge(_delta(50.0), local_steps=H).refused  # no statistic yet: passes
    guard = _guard("screen")
    _warm(guard)
    decision = guard.judge(_delta(10.0, seed=99), local_steps=H)
    assert decision.refused and decision.reason == "norm_outlier"
    assert guard.counts["norm_outlier"] == 1
    assert not guard.judge(_delta(3.0, seed=98), local_steps=H).refused  # within 4x the median


def test_a_short_round_is_judged_at_the_size_of_a_full_one() -> None:
    guard = _guard("screen")
    _warm(guard)
    # 1.5 for a round of H/4 steps stands for 6 in a full round: beyond 4x the median of ~1.2
    assert guard.judge(_delta(1.5, seed=50), local_steps=H // 4).reason == "norm_outlier"
    # the honest size of a quarter round passes
    assert not guard.judge(_delta(0.3, seed=51), local_steps=H // 4).refused
    # claiming more steps than a full round does not shrink the bar
    assert guard.judge(_delta(10.0, seed=52), local_steps=10 * H).reason == "norm_outlier"


def test_one_tensor_out_of_proportion_is_refused_though_the_whole_norm_is_ordinary() -> None:
    guard = _guard("screen")
    _warm(guard)
    decision = guard.judge(_delta(1.0, seed=60, b_share=0.9), local_steps=H)
    assert decision.reason == "tensor_outlier" and "'b'" in decision.detail


def test_a_delta_against_the_momentum_is_refused() -> None:
    centre = _delta(1.0, seed=70)
    guard = _guard("screen", centre=centre)
    _warm(guard, centre=centre)
    flipped = {n: -t for n, t in _delta(1.0, seed=70).items()}
    assert guard.judge(flipped, local_steps=H).reason == "against_momentum"
    noise = torch.Generator().manual_seed(71)  # not the global generator: the same in any test order
    along = {n: t + 0.3 * torch.randn(t.shape, generator=noise) for n, t in centre.items()}
    assert not guard.judge(along, local_steps=H).refused
    with pytest.raises(ConfigError):
        GuardConfig(min_cosine=1.5)


def test_clipping_bounds_a_delta_s_distance_to_the_centre() -> None:
    centre = {n: t * 0.5 for n, t in _delta(1.0, seed=80).items()}
    guard = _guard("clip", centre=centre)
    for seed in range(8):  # honest deltas near the centre: distances ~0.5
        near = {n: c + t for (n, c), t in zip(centre.items(), _delta(0.5, seed=seed).values(), strict=True)}
        assert not guard.judge(near, local_steps=H).refused
    tau = guard.config.clip_ratio * 0.5
    far = {n: c + t for (n, c), t in zip(centre.items(), _delta(1.9, seed=81).values(), strict=True)}
    decision = guard.judge(far, local_steps=H)
    assert decision.clipped and decision.delta is not None and guard.counts["clipped"] == 1
    distance = _norm({n: decision.delta[n] - centre[n] for n in NAMES})
    assert distance == pytest.approx(tau, rel=1e-4)
    # the direction away from the centre is kept, only shortened
    away = torch.cat([far[n] - centre[n] for n in NAMES])
    kept = torch.cat([decision.delta[n] - centre[n] for n in NAMES])
    assert float(torch.nn.functional.cosine_similarity(away, kept, dim=0)) == pytest.approx(1.0, abs=1e-5)
    # the statistic remembers the clipped distance, not the attacker's
    assert max(guard.distances) == pytest.approx(tau, rel=1e-4)


def test_without_a_centre_clipping_is_plain_norm_clipping() -> None:
    guard = _guard("clip")
    _warm(guard)  # distances = norms 1.0-1.35
    tau = guard.config.clip_ratio * statistics.median(guard.distances)
    decision = guard.judge(_delta(4.2, seed=90), local_steps=H)  # under 4x: screened in, clipped
    assert decision.clipped and decision.delta is not None
    assert _norm(decision.delta) == pytest.approx(tau, rel=1e-4) and tau < 4.2


def test_the_statistics_survive_a_checkpoint_and_a_warm_start_seeds_them() -> None:
    guard = _guard("clip")
    for seed in range(5):
        guard.observe(_delta(1.0, seed=seed))  # a trusted holder's deltas: learnt, not judged
    assert len(guard.norms) == 5 and not guard.counts["judged"]
    assert guard.judge(_delta(10.0, seed=9), local_steps=H).reason == "norm_outlier"
    restored = _guard("clip")
    restored.load_state(guard.save_state())
    assert list(restored.norms) == list(guard.norms) and restored.counts == guard.counts
    assert restored.judge(_delta(10.0, seed=10), local_steps=H).reason == "norm_outlier"
    fresh = _guard("clip")
    fresh.load_state({})  # a checkpoint from before the guard
    assert not fresh.norms


def test_the_centre_is_the_momentum_s_running_mean_of_deltas() -> None:
    params = {"w": torch.zeros(3)}
    optimizer = make_outer_optimizer(params, OuterConfig(strategy="dn", lr=0.5, momentum=0.8, buffer_size=1))
    centre = momentum_centre(optimizer)
    assert centre() is None  # no momentum yet
    g = {"w": torch.tensor([1.0, 2.0, 3.0])}
    for _ in range(60):
        optimizer.step(g)
    # m = 0.8 m + g converges to g / 0.2: the centre (1 - 0.8) m to g itself
    assert torch.allclose(centre()["w"], g["w"], rtol=1e-3)  # type: ignore[index]


def test_in_the_intake_a_refused_delta_leaves_theta_untouched_and_is_counted_by_reason() -> None:
    params = {"a.weight": torch.ones(4, 3) * 10, "b": torch.ones(5) * 10}
    plain = OuterConfig(lr=1.0, momentum=0.0, buffer_size=1, compute_exponent=0.0)
    intake, optimizer = make_intake(params, plain, version=5)
    codec = get_codec("fp32")

    def body(seq: int, scale: float) -> bytes:
        tensors = {"a.weight": torch.full((4, 3), 0.01 * scale), "b": torch.full((5,), 0.01 * scale)}
        return DeltaMessage(run_id=RUN_ID, client_id=f"c{seq}", seq=0, base_version=5, local_steps=10,
                            samples=1, tokens=1, compute_s=1.0, train_loss=1.0, codec="fp32",
                            tensors={n: codec.encode(t) for n, t in tensors.items()}).encode()

    for seq in range(4):
        assert intake.handle(body(seq, 1.0 + 0.1 * seq), now=100.0).kind == "applied"
    before = {n: t.clone() for n, t in optimizer.params.items()}
    outcome = intake.handle(body(10, 20.0), now=100.0)  # 20x: far beyond the recent median
    assert outcome.kind == "rejected" and outcome.reason == "norm_outlier"
    assert intake.rejected_by_reason["norm_outlier"] == 1
    for name, tensor in optimizer.params.items():
        torch.testing.assert_close(tensor, before[name])


def test_the_direction_is_judged_from_the_first_delta_when_a_trusted_warm_start_gave_one() -> None:
    guard = _guard("clip")
    trusted = _delta(1.0, seed=3)
    guard.observe(trusted)  # one round of the trusted holder: too few for the norm statistics
    flipped = {n: -t for n, t in trusted.items()}
    assert guard.judge(flipped, local_steps=H, sender="liar").reason == "against_momentum"
    along = {n: t + 0.2 * torch.randn(t.shape) for n, t in trusted.items()}
    assert not guard.judge(along, local_steps=H, sender="honest").refused


def test_when_most_senders_point_against_the_momentum_the_momentum_is_suspect_not_they() -> None:
    wrong = _delta(1.0, seed=4)  # a momentum an attacker got into
    guard = _guard("screen", centre={n: -t for n, t in wrong.items()})
    honest = [{n: t + 0.1 * torch.randn(t.shape) for n, t in wrong.items()} for _ in range(6)]
    verdicts = [guard.judge(d, local_steps=H, sender=f"c{i % 3}").reason for i, d in enumerate(honest)]
    # the first sender is refused; once a second of three is, the check stands aside
    assert verdicts[0] == "against_momentum"
    assert verdicts[-1] == "" and guard.counts["momentum_suspect"] >= 1
    # one sender of four against it stays refused
    guard = _guard("screen", centre=wrong)
    for i in range(3):
        assert not guard.judge(honest[i], local_steps=H, sender=f"c{i}").refused
    flipped = {n: -t for n, t in honest[3].items()}
    for _ in range(3):
        assert guard.judge(flipped, local_steps=H, sender="liar").reason == "against_momentum"


def test_with_distrust_what_the_direction_cannot_vouch_for_is_tried_on_the_operator_s_data() -> None:
    """With --guard-distrust and the operator's data at hand, a run's first deltas (no direction
    to judge by yet) and those the valve would let in are tried: in only where they lower the
    trusted loss. Here it falls along ``downhill``; the momentum is the opposite (a liar's first
    delta made it)."""
    downhill = _delta(1.0, seed=4)
    tried: list[str] = []

    def trial(delta: Mapping[str, torch.Tensor]) -> str | None:
        tried.append("")
        slope = sum(float(torch.dot(delta[n], downhill[n])) for n in NAMES)
        return None if slope > 0 else "the trusted loss rose"

    centre: dict[str, torch.Tensor] | None = None
    guard = DeltaGuard(GuardConfig(mode="screen", distrust=True), NAMES, centre=lambda: centre,
                       full_steps=H, trial=trial)
    flipped = {n: -t for n, t in downhill.items()}
    first = guard.judge(flipped, local_steps=H, sender="liar")  # nothing to judge it by: tried
    assert first.reason == "no_descent" and "no direction" in first.detail
    assert not guard.judge(downhill, local_steps=H, sender="h0").refused
    centre = flipped  # the momentum, as a liar's delta that got in would have made it
    honest = [{n: t + 0.1 * torch.randn(t.shape) for n, t in downhill.items()} for _ in range(4)]
    verdicts = [guard.judge(d, local_steps=H, sender=f"c{i}") for i, d in enumerate(honest)]
    assert verdicts[0].reason == "against_momentum"  # one sender against it: refused, not tried
    assert not any(v.refused for v in verdicts[1:])  # the valve's: tried, and downhill
    assert guard.counts["momentum_suspect"] >= 1 and len(tried) >= 3
    assert guard.counts["distrust_tried"] == len(tried) and guard.counts["distrust_cleared"] == len(tried) - 1
    # without distrust, the first delta goes in untried, and so do those the valve lets in
    plain = _guard("screen")
    assert not plain.judge(flipped, local_steps=H, sender="liar").refused
    plain = _guard("screen", centre=flipped)
    plain_verdicts = [plain.judge(d, local_steps=H, sender=f"c{i}") for i, d in enumerate(honest)]
    assert not any(v.refused for v in plain_verdicts[1:]) and plain.counts["distrust_tried"] == 0


def test_a_sender_clipped_again_and_again_goes_on_probation_and_comes_off_by_sending_clean_deltas() -> None:
    guard = _guard("clip")
    _warm(guard)  # distances = norms 1.0-1.35, so τ = 3 x ~1.2
    big = [_delta(3.9, seed=200 + i) for i in range(3)]  # under 4x the median norm: clipped, not refused
    decisions = [guard.judge(d, local_steps=H, sender="liar") for d in big]
    assert [d.clipped for d in decisions[:2]] == [True, True]
    assert decisions[2].reason == "probation" and decisions[2].delta is None  # the third strike
    # on probation a clean delta is judged, and refused, but counts in the sender's favour
    clean = [_delta(1.1, seed=300 + i) for i in range(8)]
    verdicts = [guard.judge(d, local_steps=H, sender="liar").reason for d in clean]
    # its record of 8: 3 strikes until the first of them rolls off, after 5 clean deltas
    assert verdicts == ["probation"] * 5 + [""] * 3
    assert guard.counts["probation"] == 6
    # another sender is not touched by it, and one strike alone is no probation
    assert guard.judge(_delta(3.9, seed=400), local_steps=H, sender="honest").clipped
    assert not guard.judge(_delta(1.0, seed=401), local_steps=H, sender="honest").refused


def test_direction_refusals_are_no_strike_and_probation_survives_a_checkpoint() -> None:
    trusted = _delta(1.0, seed=3)
    guard = _guard("screen", centre=trusted)
    flipped = {n: -t for n, t in trusted.items()}
    for _ in range(4):  # refused for its direction, never put on probation for it
        assert guard.judge(flipped, local_steps=H, sender="c0").reason == "against_momentum"
    assert not guard.judge(trusted, local_steps=H, sender="c0").refused
    _warm(guard, centre=trusted)
    for seed in range(3):  # three norm outliers: probation
        guard.judge(_delta(40.0, seed=500 + seed), local_steps=H, sender="c1")
    restored = _guard("screen", centre=trusted)
    restored.load_state(guard.save_state())
    along = {n: t * 1.05 for n, t in trusted.items()}
    assert restored.judge(along, local_steps=H, sender="c1").reason == "probation"
    assert not restored.judge(along, local_steps=H, sender="c0").refused
    assert _guard("screen", strikes=0).config.strikes == 0
    with pytest.raises(ConfigError):
        GuardConfig(strikes=9)


def test_one_trusted_round_is_a_statistic_and_a_restart_keeps_that_it_was_trusted() -> None:
    guard = _guard("clip")
    trusted = _delta(1.0, seed=7)
    guard.observe(trusted)  # one round of a warm start's trusted holder: the centre too
    assert guard.judge(_delta(8.0, seed=8), local_steps=H, sender="x").reason == "norm_outlier"
    # |g| ≈ 3.6: within 4 x the median (1.0); |g − c| ≈ 3.5, beyond τ = 3 x 1.0; along the centre
    along = {n: t + _delta(3.5, seed=9)[n] for n, t in trusted.items()}
    decision = guard.judge(along, local_steps=H, sender="x")
    assert decision.clipped and decision.delta is not None
    assert _norm({n: decision.delta[n] - trusted[n] for n in NAMES}) == pytest.approx(3.0, rel=1e-4)
    restored = _guard("clip")
    restored.load_state(guard.save_state())
    assert restored.judge(_delta(12.0, seed=10), local_steps=H, sender="y").reason == "norm_outlier"
    strangers_only = _guard("clip")  # without a trusted start, min_history deltas first
    assert not strangers_only.judge(_delta(1.0, seed=11), local_steps=H).refused
    assert not strangers_only.judge(_delta(8.0, seed=12), local_steps=H).refused


def _by_momentum(guard: DeltaGuard) -> DeltaGuard:
    """``guard`` judging direction by its centre alone, never by the senders' reference: for the
    direction check's own rules, on deltas made at a given cosine to that centre."""
    guard.reference.direction = lambda: None  # type: ignore[method-assign]
    return guard


def _at_cosine(centre: dict[str, torch.Tensor], cosine: float, *, seed: int) -> dict[str, torch.Tensor]:
    """A delta of norm 1 whose cosine to ``centre`` is ``cosine`` (the rest of it orthogonal)."""
    flat_c = torch.cat([centre[n].reshape(-1) for n in NAMES])
    flat_c = flat_c / flat_c.norm()
    other = torch.randn(flat_c.shape, generator=torch.Generator().manual_seed(seed))
    other = other - other.dot(flat_c) * flat_c
    flat = cosine * flat_c + math.sqrt(1 - cosine**2) * other / other.norm()
    return dict(zip(NAMES, flat.split([centre[n].numel() for n in NAMES]), strict=True))


def test_an_honest_sender_s_rare_dip_against_the_momentum_is_forgiven_a_flipper_s_is_not() -> None:
    centre = _delta(1.0, seed=80)
    guard = _by_momentum(_guard("screen", centre=centre))  # forgive_after 4, the default
    for seed in range(6):  # three senders, six honest deltas each (cosines 0.3-0.55)
        for sender in ("honest", "other", "third"):
            assert not guard.judge(_at_cosine(centre, 0.3 + 0.05 * seed, seed=seed), local_steps=H,
                                   sender=sender).refused
    assert guard.direction.median_cosine() == pytest.approx(0.425, abs=1e-4)
    dip = _at_cosine(centre, -0.1, seed=90)  # an honest round that is mostly noise late in a run
    assert not guard.judge(dip, local_steps=H, sender="honest").refused
    assert guard.counts["direction_forgiven"] == 1
    # a second dip before four more along the momentum is refused
    assert guard.judge(dip, local_steps=H, sender="honest").reason == "against_momentum"
    flipped = _at_cosine(centre, -0.45, seed=91)  # a sign-flipper: against, round after round
    for _ in range(6):
        assert guard.judge(flipped, local_steps=H, sender="liar").reason == "against_momentum"
        for sender in ("other", "third"):
            guard.judge(_at_cosine(centre, 0.4, seed=110), local_steps=H, sender=sender)
    for seed in range(4):  # the honest sender back along the momentum: forgiven once more
        guard.judge(_at_cosine(centre, 0.4, seed=100 + seed), local_steps=H, sender="honest")
    restored = _by_momentum(_guard("screen", centre=centre))
    restored.load_state(guard.save_state())  # the senders' directions are kept in the checkpoint
    assert not restored.judge(dip, local_steps=H, sender="honest").refused
    never = _by_momentum(_guard("screen", centre=centre, forgive_after=0))
    for seed in range(6):
        never.judge(_at_cosine(centre, 0.4, seed=seed), local_steps=H, sender="honest")
    assert never.judge(dip, local_steps=H, sender="honest").reason == "against_momentum"
    with pytest.raises(ConfigError):
        GuardConfig(forgive_after=-1)
    with pytest.raises(ConfigError):
        GuardConfig(forgive_after=65)


def test_the_valve_opens_for_the_first_sender_to_point_back_once_the_others_do() -> None:
    """When the momentum overshoots, every honest sender points back: each sender's latest
    direction counts, refused or not, so the sender judged first is not the one left refused."""
    centre = _delta(1.0, seed=81)
    guard = _by_momentum(_guard("screen", centre=centre, forgive_after=0))
    for seed in range(3):
        for sender in ("fast", "medium", "slow"):
            guard.judge(_at_cosine(centre, 0.3, seed=seed), local_steps=H, sender=sender)
    back = _at_cosine(centre, -0.08, seed=95)
    assert guard.judge(back, local_steps=H, sender="fast").reason == "against_momentum"  # alone so far
    assert not guard.judge(back, local_steps=H, sender="medium").refused  # fast and medium: 2 of 3
    assert not guard.judge(back, local_steps=H, sender="fast").refused  # still 2 of 3: fast too
    assert guard.counts["momentum_suspect"] == 2
    # one liar among three honest senders pointing along stays refused
    along = _at_cosine(centre, 0.3, seed=96)
    for sender in ("fast", "medium", "slow"):
        guard.judge(along, local_steps=H, sender=sender)
    liar = _at_cosine(centre, -0.3, seed=97)
    assert guard.judge(liar, local_steps=H, sender="liar").reason == "against_momentum"


def test_late_in_a_run_the_threshold_follows_the_spread_of_recent_cosines() -> None:
    """Early (cosines well above 0) the threshold is min_cosine; once the momentum's direction has
    faded (median near 0, a spread of about ±0.05) only what lies far below that spread is refused."""
    centre = _delta(1.0, seed=82)
    guard = _by_momentum(_guard("screen", centre=centre, forgive_after=0))
    senders = ("a", "b", "c")
    for seed in range(9):  # early: cosines 0.4-0.56
        assert not guard.judge(_at_cosine(centre, 0.4 + 0.02 * seed, seed=seed), local_steps=H,
                               sender=senders[seed % 3]).refused
    assert guard.direction.least() == 0.0  # min_cosine: the spread is far above it
    dip = _at_cosine(centre, -0.05, seed=30)
    assert guard.judge(dip, local_steps=H, sender="a").reason == "against_momentum"
    for seed in range(64):  # late: cosines around 0.01, from -0.04 to 0.06
        guard.judge(_at_cosine(centre, 0.01 + 0.05 * math.sin(seed), seed=40 + seed), local_steps=H,
                    sender=senders[seed % 3])
    least = guard.direction.least()
    assert -0.16 < least < -0.05, least
    assert not guard.judge(_at_cosine(centre, -0.04, seed=200), local_steps=H, sender="a").refused
    flipped = _at_cosine(centre, -0.3, seed=201)
    assert guard.judge(flipped, local_steps=H, sender="a").reason == "against_momentum"
    plain = _by_momentum(_guard("screen", centre=centre, forgive_after=0, direction_spread=0.0))
    plain.direction.cosines.extend(guard.direction.cosines)
    assert plain.direction.least() == 0.0
    with pytest.raises(ConfigError):
        GuardConfig(direction_spread=-1.0)
