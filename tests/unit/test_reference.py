"""The direction check's reference: one share per recent sender, so a fast sign-flipper that
holds most of the compute weight (and so of the momentum) cannot turn what deltas are judged by."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch

from coordinator.direction import DAMP, DAMPED_WEIGHT, PASS, REFUSE, TRY, DirectionCheck
from coordinator.guard import DeltaGuard, GuardConfig
from coordinator.reference import MIN_VOTERS, Reference

NAMES = ["w", "b"]
H = 20


def _unit(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(110, generator=gen)
    flat = flat / flat.norm()
    return {"w": flat[:100], "b": flat[100:]}


def _around(way: dict[str, torch.Tensor], sign: float, seed: int,
            noise: float = 0.5) -> dict[str, torch.Tensor]:
    """``sign`` × ``way`` plus noise: an honest delta (+1) or a sign-flipped one (−1)."""
    other = _unit(seed)
    return {n: sign * (way[n] + noise * other[n]) for n in NAMES}


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    dot = sum(float(torch.dot(a[n].float().reshape(-1), b[n].float().reshape(-1))) for n in NAMES)
    na = math.sqrt(sum(float(a[n].float().norm()) ** 2 for n in NAMES))
    nb = math.sqrt(sum(float(b[n].float().norm()) ** 2 for n in NAMES))
    return dot / (na * nb)


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.norm()) ** 2 for t in delta.values()))


def test_a_sender_that_votes_four_times_as_often_holds_one_share_not_four() -> None:
    way = _unit(1)
    reference = Reference()
    seed = 100
    for _ in range(12):  # each round: the liar sends 4 big deltas, each honest sender one small one
        for _ in range(4):
            seed += 1
            liar = {n: 10 * t for n, t in _around(way, -1.0, seed).items()}
            reference.vote("liar", liar, _norm(liar))
        for sender in ("a", "b", "c"):
            seed += 1
            honest = _around(way, 1.0, seed)
            reference.vote(sender, honest, _norm(honest))
    direction = reference.direction()
    assert direction is not None
    assert _cosine(direction, way) > 0.5  # a compute-weighted mean would point the liar's way


def test_the_reference_waits_for_enough_named_senders() -> None:
    way = _unit(2)
    reference = Reference()
    for _ in range(10):
        reference.vote("", way, 1.0)  # an unnamed sender does not vote
    assert reference.tensors is None and reference.direction() is None
    for i in range(MIN_VOTERS - 1):
        reference.vote(f"s{i}", way, 1.0)
    assert reference.direction() is None  # the momentum judges until then
    reference.vote("last", way, 1.0)
    direction = reference.direction()
    assert direction is not None and direction["w"].dtype == torch.float32
    assert reference.tensors is not None and reference.tensors["w"].dtype == torch.bfloat16


def test_the_guard_refuses_a_fast_flipper_that_turned_the_momentum() -> None:
    """The momentum points the flipper's way (it holds most of the compute weight): judged by the
    momentum, the honest would be refused; judged by the senders' reference, the flipper is."""
    way = _unit(3)
    poisoned = {n: -t for n, t in way.items()}
    guard = DeltaGuard(GuardConfig(mode="screen", forgive_after=0), NAMES, centre=lambda: poisoned,
                       full_steps=H)
    seed = 200
    verdicts: dict[str, list[str]] = {"liar": [], "honest": []}
    for _ in range(8):
        for sender in ("liar", "a", "b", "c"):
            seed += 1
            sign = -1.0 if sender == "liar" else 1.0
            decision = guard.judge(_around(way, sign, seed), local_steps=H, sender=sender)
            verdicts["liar" if sender == "liar" else "honest"].append(decision.reason)
    # the first deltas are judged by the poisoned momentum (honest refused until the valve or
    # the reference), then the reference takes over
    assert verdicts["liar"][-5:] == ["against_momentum"] * 5
    assert verdicts["honest"][-15:] == [""] * 15
    assert guard.reference.direction() is not None


def test_the_reference_is_kept_in_the_checkpoint() -> None:
    guard = DeltaGuard(GuardConfig(), NAMES, full_steps=H)
    way = _unit(4)
    for i, sender in enumerate(("a", "b", "c", "a")):
        guard.judge(_around(way, 1.0, 300 + i), local_steps=H, sender=sender)
    assert guard.reference.direction() is not None
    restored = DeltaGuard(GuardConfig(), NAMES, full_steps=H)
    restored.load_state(guard.save_state())
    restored.load_tensors(guard.tensors())
    assert list(restored.reference.voters) == list(guard.reference.voters)
    for name in NAMES:
        assert torch.equal(restored.reference.tensors[name], guard.reference.tensors[name])
    other = DeltaGuard(GuardConfig(), ["w", "other"], full_steps=H)
    other.load_tensors(guard.tensors())  # another model's names: left out, not half taken
    assert other.reference.tensors is None


def test_judged_by_the_reference_a_little_below_zero_is_damped_far_below_is_refused() -> None:
    """Inside the spread of recent cosines a delta is applied at a quarter of its weight (the
    fastest honest client's late corrections point a little against the reference; a fast liar
    there can no longer outweigh the rest); below it, refused; the spread and valve of the
    momentum do not let anything through."""
    counts: Counter[str] = Counter()
    check = DirectionCheck(0.0, 0, counts, spread=2.0, window=64)
    check.judge_by(True)
    for i in range(16):  # accepted cosines 0.05-0.35: median 0.2, σ about 0.11
        check.accepted(0.05 + 0.02 * i)
    least = check.least()
    assert -0.1 < least < 0
    assert check.judge("s0", 0.01) == PASS
    assert check.judge("s1", least / 2) == DAMP and counts["damped"] == 1
    assert check.judge("liar", least - 0.05) == REFUSE
    # three senders of four point against it at once: no valve stands aside (it does for the momentum)
    for sender in ("s0", "s1", "s2"):
        assert check.judge(sender, -0.5) == REFUSE
    assert counts["momentum_suspect"] == 0


def test_a_sender_that_mostly_pointed_against_the_reference_must_reach_the_median_to_pass() -> None:
    """A sign-flipper refused round after round creeps up to a cosine near 0 late in a run; the
    plain rule would let it in there. Distrusted (3 of its last 4 pointed against), it passes only
    at the median of the accepted cosines, and clears once half of its last 4 reach it. An honest
    sender's rare dip leaves it trusted. Where the plain rule would let a distrusted sender's delta
    in, the verdict is TRY where the guard can try it on the operator's data, REFUSE where not."""
    counts: Counter[str] = Counter()
    check = DirectionCheck(0.0, 4, counts, spread=2.0, window=64, distrust=True, tries=True)
    untried = DirectionCheck(0.0, 4, Counter(), spread=2.0, window=64, distrust=True)
    for each in (check, untried):
        each.judge_by(True)
        for i in range(16):  # accepted cosines 0.05-0.35: median 0.2
            each.accepted(0.05 + 0.02 * i)
        for cosine in (-0.4, -0.3, -0.2):
            assert each.judge("liar", cosine) == REFUSE
    assert untried.judge("liar", 0.01) == REFUSE
    assert check.judge("liar", 0.01) == TRY  # the plain rule: PASS; the guard tries it on its data
    assert not check.tried_damped  # let in by the trial, it is applied whole
    assert check.judge("liar", -0.02) == TRY  # the plain rule: DAMP
    assert check.tried_damped  # let in, it is applied damped
    assert check.judge("liar", -0.5) == REFUSE  # below what the plain rule lets in: no trial
    assert counts["direction_distrusted"] == 2 and counts["damped"] == 0
    assert 0.19 < check.refused_below < 0.21
    assert check.judge("liar", 0.25) == PASS  # at an honest delta's typical cosine: in, still distrusted
    assert check.judge("liar", 0.05) == TRY
    assert check.judge("liar", 0.3) == PASS  # now 2 of its last 4 reached the median: trusted again
    assert check.judge("liar", 0.05) == PASS
    # an honest sender: one dip is damped, the next delta near 0 passes
    for cosine in (0.2, 0.1, 0.3):
        assert check.judge("honest", cosine) == PASS
    assert check.judge("honest", -0.02) in (PASS, DAMP)
    assert check.judge("honest", 0.01) == PASS
    # judged by the momentum (before three senders voted) nobody is distrusted
    momentum = DirectionCheck(0.0, 4, Counter(), spread=2.0, window=64, distrust=True)
    momentum.judge_by(False)
    for cosine in (-0.4, -0.3, -0.2):
        momentum.judge("liar", cosine)
    assert momentum.judge("liar", 0.01) == PASS


def test_the_guard_refuses_a_distrusted_sender_s_delta_below_the_median_and_says_why() -> None:
    """With --guard-distrust, after its flipped deltas were refused, a liar's delta that points a
    little along the reference is refused where the guard has no operator's data to try it on
    (the plain rule, --no-guard-distrust, lets it in, as it does the same delta from a sender with
    no record)."""
    way = _unit(6)
    weak = {n: 0.3 * way[n] + _unit(600)[n] for n in NAMES}
    assert 0.1 < _cosine(weak, way) < 0.5  # along the reference, below the honest deltas' ≈ 0.9
    for distrust in (True, False):
        guard = DeltaGuard(GuardConfig(mode="screen", distrust=distrust), NAMES, centre=lambda: way,
                           full_steps=H)
        seed = 500
        for _ in range(6):
            for sender in ("a", "b", "c", "liar"):
                seed += 1
                sign = -1.0 if sender == "liar" else 1.0
                guard.judge(_around(way, sign, seed), local_steps=H, sender=sender)
        assert guard.reference.direction() is not None
        decision = guard.judge(weak, local_steps=H, sender="liar")
        if distrust:
            assert decision.reason == "against_momentum" and "median of accepted deltas" in decision.detail
            assert guard.counts["direction_distrusted"] == 1
        else:  # --no-guard-distrust: the plain rule
            assert not decision.refused and guard.counts["direction_distrusted"] == 0
        assert not guard.judge(weak, local_steps=H, sender="newcomer").refused


def test_a_distrusted_sender_s_delta_is_let_in_only_if_it_lowers_the_trusted_loss() -> None:
    """With a trial (the coordinator's strict descent check on its own data), a distrusted
    sender's delta below the median that the plain rule would let in is tried: in where it lowers
    the trusted loss (counted as cleared), refused where not, saying why; a sender that is not
    distrusted is never tried. Here the trusted loss falls along ``downhill``, a direction the
    reference does not know."""
    way, downhill = _unit(6), _unit(7)
    tried: list[float] = []

    def trial(delta: Mapping[str, torch.Tensor]) -> str | None:
        slope = sum(float(torch.dot(delta[n].reshape(-1), downhill[n].reshape(-1))) for n in NAMES)
        tried.append(slope)
        return None if slope > 0 else "the trusted loss rose"

    guard = DeltaGuard(GuardConfig(mode="screen", distrust=True), NAMES, centre=lambda: way,
                       full_steps=H, trial=trial)
    seed = 500
    for _ in range(6):
        for sender in ("a", "b", "c", "liar"):
            seed += 1
            guard.judge(_around(way, -1.0 if sender == "liar" else 1.0, seed), local_steps=H, sender=sender)
    assert tried == []  # the flipped deltas were refused outright: below what the plain rule lets in
    reference = guard.reference.direction()
    assert reference is not None
    along = {n: reference[n].float() / _norm(dict(reference)) for n in NAMES}
    overlap = sum(float(torch.dot(downhill[n], along[n])) for n in NAMES)
    for name in NAMES:  # downhill, square to the reference
        downhill[name] = downhill[name] - overlap * along[name]
    for sign in (-1.0, 1.0):  # a little along the reference, and up or down the trusted loss
        weak = {n: 0.3 * along[n] + sign * downhill[n] for n in NAMES}
        assert 0.1 < _cosine(weak, along) < 0.5  # the honest ones': ≈ 0.9
        decision = guard.judge(weak, local_steps=H, sender="liar")
        if sign > 0:
            assert not decision.refused and decision.delta is weak
        else:
            assert decision.reason == "against_momentum" and "on the operator's data" in decision.detail
    assert len(tried) == 2 and guard.counts["distrust_tried"] == 2 and guard.counts["distrust_cleared"] == 1
    assert not any(guard.probation.records["liar"])  # a direction refusal is no strike
    guard.judge(weak, local_steps=H, sender="newcomer")
    assert len(tried) == 2  # not distrusted: the plain rule, no trial


def test_a_damped_delta_is_applied_at_a_quarter_and_votes_as_one() -> None:
    guard = DeltaGuard(GuardConfig(mode="screen"), NAMES, full_steps=H)
    guard.direction.judge = lambda sender, cosine: DAMP  # type: ignore[method-assign]
    way = _unit(5)
    guard.judge(_around(way, 1.0, 400), local_steps=H, sender="a")  # no centre yet: not judged
    guard.judge(_around(way, 1.0, 401), local_steps=H, sender="b")
    delta = _around(way, 1.0, 402)
    guard.centre = lambda: way
    decision = guard.judge(delta, local_steps=H, sender="c")
    assert decision.damped and decision.reason == "damped" and not decision.refused
    for name in NAMES:
        torch.testing.assert_close(decision.delta[name], delta[name] * DAMPED_WEIGHT)
    assert list(guard.reference.voters) == ["a", "b", "c"]
