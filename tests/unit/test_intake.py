"""The delta handler's checks and outcomes, without any server."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.guard import GuardConfig
from coordinator.identity import AuthMode
from coordinator.intake import SQUARES_CHUNK, DeltaIntake, IntakeConfig, exact_sum_of_squares, sum_of_squares
from coordinator.outer_optimizer import OuterConfig, OuterOptimizer, make_outer_optimizer
from coordinator.progress import RunProgress
from coordinator.registry import ClientRegistry, PlanConfig
from coordinator.run_state import build_intake
from coordinator.warm_start import WarmStart
from shared.codecs import get_codec
from shared.errors import ConfigError
from shared.protocol import DeltaMessage

RUN_ID = "unit-run"


def make_intake(params: dict[str, torch.Tensor], outer: OuterConfig, *, version: int,
                intake: IntakeConfig | None = None, warm_start_steps: int = 0, handover_s: float = 30.0,
                guard: GuardConfig | None = None) -> tuple[DeltaIntake, OuterOptimizer]:
    """An intake wired as a run wires it (admission rules, warm start, the guard), on ``params``."""
    config = CoordinatorConfig(auth=AuthMode.OPEN, outer=outer, intake=intake or IntakeConfig(),
                               plan=PlanConfig(warm_start_steps=warm_start_steps),
                               guard=guard or GuardConfig())
    optimizer = make_outer_optimizer(params, outer)
    progress = RunProgress()
    warm = WarmStart(warm_start_steps, progress=progress, handover_s=handover_s)
    handler = build_intake(config, optimizer=optimizer, registry=ClientRegistry(config.plan),
                           progress=progress, warm=warm, barrier=None, run_id=RUN_ID)
    handler.take_version(version)
    return handler, optimizer


def _intake(**config: object) -> DeltaIntake:
    params = {"a.weight": torch.ones(4, 3), "b": torch.zeros(5)}
    plain = OuterConfig(lr=1.0, momentum=0.0, buffer_size=1, compute_exponent=0.0)
    intake, _ = make_intake(params, plain, version=5, intake=IntakeConfig(**config))  # type: ignore[arg-type]
    return intake


def _delta(**overrides: object) -> bytes:
    tensors = {"a.weight": torch.full((4, 3), 0.1), "b": torch.full((5,), -0.1)}
    codec_name = str(overrides.pop("codec", "fp32"))
    codec = get_codec(codec_name if codec_name != "zip" else "fp32")
    fields = dict(
        run_id=RUN_ID,
        client_id="c1",
        seq=0,
        base_version=5,
        local_steps=10,
        samples=40,
        tokens=4000,
        compute_s=2.0,
        train_loss=2.5,
        codec=codec_name,
        tensors={n: codec.encode(t) for n, t in tensors.items()},
    )
    fields.update(overrides)
    return DeltaMessage(**fields).encode()  # type: ignore[arg-type]


def test_good_delta_is_applied_and_moves_the_model() -> None:
    intake = _intake()
    outcome = intake.handle(_delta(), now=100.0)
    assert outcome.kind == "applied"
    torch.testing.assert_close(intake.params["a.weight"], torch.full((4, 3), 0.9))
    torch.testing.assert_close(intake.params["b"], torch.full((5,), 0.1))
    record = intake.registry.clients["c1"]
    assert record.updates == 1 and record.local_steps == 10
    # its claimed compute_s is shown, never used; a first delta measures no speed (test_registry.py)
    assert record.steps_per_s == 0.0 and record.reported_compute_s == pytest.approx(2.0)
    assert intake.progress.tokens == 4000


def test_same_client_and_seq_twice_is_a_duplicate_applied_once() -> None:
    intake = _intake()
    body = _delta()
    assert intake.handle(body).kind == "applied"
    before = intake.params["b"].clone()
    outcome = intake.handle(body)
    assert outcome.kind == "duplicate"
    torch.testing.assert_close(intake.params["b"], before)
    assert intake.counts["applied"] == 1 and intake.counts["duplicate"] == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"\xc1\xc1garbage", "undecodable"),
        (msgpack.packb([1, 2, 3]), "wrong_schema"),
        (_delta(run_id="another-run"), "wrong_run"),
        (_delta(client_id="bad id!"), "bad_client_id"),
        (_delta(base_version=6), "future_version"),
        (_delta(local_steps=0), "bad_steps"),
        (_delta(codec="zip", tensors={"a.weight": b"", "b": b""}), "unknown_codec"),
        (_delta(tensors={"a.weight": b"\0" * 48}), "wrong_names"),
        (_delta(tensors={"a.weight": b"\0" * 48, "b": b"\0" * 20, "c": b""}), "wrong_names"),
        (_delta(tensors={"a.weight": b"\0" * 47, "b": b"\0" * 20}), "wrong_size"),
        (
            _delta(tensors={"a.weight": torch.full((12,), math.nan).numpy().tobytes(), "b": b"\0" * 20}),
            "non_finite",
        ),
        (
            _delta(tensors={"a.weight": torch.full((12,), 1e3).numpy().tobytes(), "b": b"\0" * 20}),
            "norm_too_large",
        ),
    ],
)
def test_bad_deltas_are_rejected_with_their_reason_and_change_nothing(body: bytes, reason: str) -> None:
    intake = _intake(max_staleness=3)
    before = {n: p.clone() for n, p in intake.params.items()}
    outcome = intake.handle(body)
    assert (outcome.kind, outcome.reason) == ("rejected", reason)
    assert intake.rejected_by_reason[reason] == 1
    for name, tensor in before.items():
        assert torch.equal(intake.params[name], tensor)


def test_staleness_counts_deltas_applied_since_the_base_not_versions() -> None:
    """Versions move once per commit (many deltas each under load); staleness counts arrivals, as
    the simulator does, so the bound and the discount mean the same under any commit cadence."""
    intake = _intake(max_staleness=3)
    intake.take_version(9)  # four versions later, but nothing applied since version 5
    assert intake.handle(_delta(client_id="c1", seq=0, base_version=5)).staleness == 0
    intake.take_version(10)
    for seq in range(3):  # three more deltas in one version
        assert intake.handle(_delta(client_id=f"d{seq}", seq=0, base_version=10)).kind == "applied"
    intake.take_version(11)
    ok = intake.handle(_delta(client_id="c2", seq=0, base_version=10))  # 3 applied since 10: at the bound
    assert (ok.kind, ok.staleness) == ("applied", 3)
    stale = intake.handle(_delta(client_id="c3", seq=0, base_version=5))  # 5 applied since 5
    assert (stale.kind, stale.reason, stale.staleness) == ("rejected", "stale", 5)
    before = {n: p.clone() for n, p in intake.params.items()}
    assert intake.handle(_delta(client_id="c4", seq=0, base_version=0)).reason == "stale"
    assert all(torch.equal(intake.params[n], t) for n, t in before.items())


def test_automatic_staleness_bound_grows_with_the_active_clients() -> None:
    from coordinator.admission import STALENESS_FLOOR, STALENESS_PER_CLIENT, StalenessBound

    auto = StalenessBound(0)
    assert auto.bound(1) == STALENESS_FLOOR
    assert auto.bound(16) == 16 * STALENESS_PER_CLIENT
    assert StalenessBound(5).bound(100) == 5


def test_the_arrival_count_of_each_version_survives_a_checkpoint() -> None:
    intake = _intake(max_staleness=3)
    for seq in range(4):
        intake.handle(_delta(client_id=f"d{seq}", seq=0, base_version=5))
    intake.take_version(6)
    resumed = _intake(max_staleness=3)
    resumed.load_state(intake.save_state())
    resumed.take_version(6)
    assert resumed.staleness_of(5) == 4 and resumed.staleness_of(6) == 0



def test_int8_delta_is_decoded_within_its_error_bound() -> None:
    intake = _intake()
    assert intake.handle(_delta(codec="int8")).kind == "applied"
    torch.testing.assert_close(
        intake.params["a.weight"], torch.full((4, 3), 0.9), atol=0.1 / 254 + 1e-6, rtol=0
    )


def test_active_clients_set_the_buffer_size() -> None:
    params = {"a.weight": torch.ones(4, 3), "b": torch.zeros(5)}
    intake, optimizer = make_intake(params, OuterConfig(lr=1.0, momentum=0.5, buffer_size=0), version=5)
    intake.handle(_delta(client_id="c1"), now=100.0)  # alone: N = 1, momentum moves
    assert optimizer.pending == 0
    intake.handle(_delta(client_id="c2"), now=101.0)  # c1 and c2 active: N = 2
    assert optimizer.pending == 1


def test_a_rejected_delta_of_a_known_client_is_settled_once() -> None:
    intake = _intake()
    assert intake.handle(_delta(seq=0)).kind == "applied"  # c1 is now known
    stale = _delta(seq=1, base_version=6)  # a base from the future: rejected
    assert intake.handle(stale).reason == "future_version"
    intake.take_version(6)  # even once that base exists, the redelivery is not judged again
    outcome = intake.handle(stale)
    assert outcome.kind == "duplicate"
    assert intake.counts["applied"] == 1 and intake.rejected_by_reason["future_version"] == 1


def _fp32_tensors(a: torch.Tensor, b: torch.Tensor) -> dict[str, bytes]:
    codec = get_codec("fp32")
    return {"a.weight": codec.encode(a), "b": codec.encode(b)}


def _int8_blob(scale: float, numel: int) -> bytes:
    """One int8 block: its fp32 scale as sent (a sender chooses it freely), then numel values of 127."""
    return torch.tensor([scale], dtype=torch.float32).numpy().astype("<f4").tobytes() + b"\x7f" * numel


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        # finite values whose float32 squares overflow: too large, as the float64 sums always said
        (_fp32_tensors(torch.full((4, 3), 1e20), torch.zeros(5)), "norm_too_large"),
        (_fp32_tensors(torch.full((4, 3), 3e38), torch.full((5,), -3e38)), "norm_too_large"),
        (_fp32_tensors(torch.tensor([1e30] + [0.01] * 11).view(4, 3), torch.zeros(5)), "norm_too_large"),
        ({"a.weight": _int8_blob(1e30, 12), "b": _int8_blob(0.0, 5)}, "norm_too_large"),
        # a NaN or an Inf in one tensor only, the other finite
        (_fp32_tensors(torch.tensor([0.01] * 11 + [math.nan]).view(4, 3), torch.zeros(5)), "non_finite"),
        (_fp32_tensors(torch.zeros(4, 3), torch.tensor([0.0, 0.0, math.inf, 0.0, 0.0])), "non_finite"),
        (_fp32_tensors(torch.zeros(4, 3), torch.full((5,), -math.inf)), "non_finite"),
        (_fp32_tensors(torch.full((4, 3), 1e20), torch.tensor([math.nan] * 5)), "non_finite"),
        ({"a.weight": _int8_blob(math.inf, 12), "b": _int8_blob(0.0, 5)}, "non_finite"),
        ({"a.weight": _int8_blob(0.01, 12), "b": _int8_blob(math.nan, 5)}, "non_finite"),
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the codec's inf × 0
def test_overflow_nan_and_inf_get_the_reason_the_float64_check_gave(tensors: dict[str, bytes],
                                                                    reason: str) -> None:
    codec = "int8" if len(tensors["b"]) != 20 else "fp32"
    intake = _intake()
    before = {n: p.clone() for n, p in intake.params.items()}
    outcome = intake.handle(_delta(codec=codec, tensors=tensors))
    assert (outcome.kind, outcome.reason) == ("rejected", reason)
    assert all(torch.equal(intake.params[n], t) for n, t in before.items())


def test_the_fast_sum_of_squares_matches_float64_and_flags_what_it_cannot_hold() -> None:
    torch.manual_seed(0)
    big = torch.randn(3 * SQUARES_CHUNK + 7)  # several chunks
    assert sum_of_squares([big, big[:5]]) == pytest.approx(exact_sum_of_squares([big, big[:5]]), rel=1e-6)
    assert math.isnan(sum_of_squares([big, torch.tensor([1.0, math.nan])]))
    assert sum_of_squares([torch.tensor([-math.inf]), big]) == math.inf
    huge = torch.full((4,), 1e20)  # finite, but 1e40 is not a float32
    assert sum_of_squares([huge]) == math.inf and exact_sum_of_squares([huge]) == pytest.approx(4e40)


def test_a_norm_between_the_fast_and_the_float64_sums_gets_the_float64_verdict() -> None:
    """A bound placed between the float32 and the float64 |g| of the same values: the float64
    sums decide, as they did alone before the fast check, whichever of the two is the larger."""
    generator = torch.Generator().manual_seed(1)
    found: dict[bool, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
    for _ in range(1000):  # values whose float32 sum of squares is below, and above, the float64 one
        a, b = torch.rand(4, 3, generator=generator), torch.rand(5, generator=generator)
        fast, exact = math.sqrt(sum_of_squares([a, b])), math.sqrt(exact_sum_of_squares([a, b]))
        if fast != exact:
            found.setdefault(exact > fast, (a, b, fast, exact))
        if len(found) == 2:
            break
    assert set(found) == {True, False}
    theta_norm = math.sqrt(12.0)  # θ: a = 1, b = 0 (exact in both)
    for exact_above, (a, b, fast, exact) in found.items():
        intake = _intake(max_norm_ratio=(fast + exact) / 2 / theta_norm)
        outcome = intake.handle(_delta(tensors=_fp32_tensors(a, b)))
        assert outcome.reason == ("norm_too_large" if exact_above else "")


def test_the_norm_bound_follows_every_change_of_theta() -> None:
    """|θ| is remembered between deltas only while θ is unchanged: after an applied delta, an
    in-place change from elsewhere (a sync round's step) and new tensors (a restore)."""
    intake = _intake()  # θ: a = 1 (12 values), b = 0: |θ| = √12 ≈ 3.46
    big = _fp32_tensors(torch.zeros(4, 3), torch.full((5,), 1.5))  # |g| = 1.5 √5 ≈ 3.35
    shrink = _fp32_tensors(torch.full((4, 3), 0.5), torch.zeros(5))  # θ: a = 0.5, |θ| ≈ 1.73
    assert intake.handle(_delta(client_id="c1", tensors=shrink)).kind == "applied"
    assert intake.handle(_delta(client_id="c2", tensors=big)).reason == "norm_too_large"
    intake.params["a.weight"].fill_(2.0)  # |θ| = √48
    assert intake.handle(_delta(client_id="c3", tensors=big)).kind == "applied"
    intake.params["a.weight"] = torch.full((4, 3), 0.1)  # a restore's tensors: |θ| ≈ 0.35 with b = 0
    intake.params["b"] = torch.zeros(5)
    small = _fp32_tensors(torch.zeros(4, 3), torch.full((5,), 0.2))  # |g| ≈ 0.45
    assert intake.handle(_delta(client_id="c4", tensors=small)).reason == "norm_too_large"
    intake.take_version(6)
    intake.params["b"].fill_(1.0)  # |θ| ≈ 2.27
    assert intake.handle(_delta(client_id="c5", base_version=6, tensors=small)).kind == "applied"


@pytest.mark.parametrize(("cap", "share"), [(0.0, 1 / 1.2), (0.5, 1 / 3)])
def test_the_weight_cap_holds_the_fastest_client_to_a_share_of_the_others(cap: float, share: float) -> None:
    """Outer SGD (θ -= ε·w·g/W, ε = 1) with compute weights: two slow clients ran 3 of H = 30
    steps (w = 0.1 each); the fast one sends a full round (w = 1). Uncapped it moves θ by
    1/1.2 of its delta; capped at half the others' weight (0.1), by a third of it."""
    params = {"a.weight": torch.ones(4, 3), "b": torch.zeros(5)}
    outer = OuterConfig(strategy="sgd", lr=1.0, momentum=0.0, compute_exponent=1.0, weight_cap=cap)
    intake, _ = make_intake(params, outer, version=5)
    for slow in ("slow1", "slow2"):
        assert intake.handle(_delta(client_id=slow, local_steps=3), now=100.0).kind == "applied"
    before = intake.params["b"].clone()
    assert intake.handle(_delta(client_id="fast", local_steps=30), now=101.0).kind == "applied"
    torch.testing.assert_close(intake.params["b"] - before, torch.full((5,), 0.1 * share))


def test_the_weight_cap_leaves_two_clients_alone_and_refuses_a_negative_cap() -> None:
    config = OuterConfig(weight_cap=0.5)
    assert config.capped([1.0, 0.125]) == [1.0, 0.125]  # with two, each would slow the other
    assert config.capped([1.0, 0.5, 0.25, 0.125]) == [0.4375, 0.5, 0.25, 0.125]
    assert OuterConfig().capped([1.0, 0.1, 0.1]) == [1.0, 0.1, 0.1]  # off by default
    with pytest.raises(ConfigError):
        OuterConfig(weight_cap=-0.5)
