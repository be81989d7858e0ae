"""Delta codecs: exactness, error bounds, size checks and error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.codecs import (
    CODECS,
    INT8_BLOCK,
    ErrorFeedback,
    Fp16Codec,
    Fp32Codec,
    Int8BlockCodec,
    get_codec,
)
from shared.errors import ProtocolError

SIZES = [1, 255, 256, 257, 10_000]


def _int8_bound(x: torch.Tensor, block: int = INT8_BLOCK) -> torch.Tensor:
    """Per-element worst-case int8 error: absmax(block) / 254, plus float32 rounding slack."""
    flat = x.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block
    absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, block).amax(dim=1)
    per_elem = absmax.repeat_interleave(block)[: flat.numel()]
    # 1e-6 relative covers the float32 divide/multiply; 1e-30 absolute covers subnormal scales.
    return per_elem / 254 * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("numel", SIZES)
def test_fp32_round_trips_exactly(numel: int) -> None:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e3
    codec = Fp32Codec()
    assert torch.equal(codec.decode(codec.encode(x), numel), x)


def test_fp32_flattens_any_shape() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    codec = Fp32Codec()
    assert torch.equal(codec.decode(codec.encode(x), 24), x.reshape(-1))


@pytest.mark.parametrize("numel", SIZES)
def test_fp16_relative_error_within_half_ulp(numel: int) -> None:
    gen = torch.Generator().manual_seed(numel)
    # magnitudes spread over the fp16 normal range [2^-14, 65504]
    exponent = torch.rand(numel, generator=gen) * 29.9 - 14
    sign = torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    x = sign * torch.pow(2.0, exponent)
    codec = Fp16Codec()
    y = codec.decode(codec.encode(x), numel)
    relative = ((y - x).abs() / x.abs()).max().item()
    assert relative <= 2.0**-11
    assert relative > 0  # it is lossy: the check above is not vacuous


def test_fp16_accepts_its_largest_value() -> None:
    codec = Fp16Codec()
    x = torch.tensor([65504.0, -65504.0])
    assert torch.equal(codec.decode(codec.encode(x), 2), x)


@pytest.mark.parametrize("value", [65505.0, -70000.0, 1e6, float("inf")])
def test_fp16_refuses_values_beyond_its_range(value: float) -> None:
    with pytest.raises(ValueError, match="fp16 range"):
        Fp16Codec().encode(torch.tensor([0.5, value]))


@pytest.mark.parametrize("numel", SIZES)
def test_int8_error_within_half_step_per_block(numel: int) -> None:
    gen = torch.Generator().manual_seed(numel)
    # blocks of very different magnitudes, so a shared scale would fail the bound
    x = torch.randn(numel, generator=gen) * torch.pow(10.0, torch.randint(-6, 4, (numel,), generator=gen))
    codec = Int8BlockCodec()
    y = codec.decode(codec.encode(x), numel)
    error = (y - x).abs()
    assert torch.all(error <= _int8_bound(x))


def test_int8_keeps_block_extremes_exact_and_is_lossy_elsewhere() -> None:
    x = torch.linspace(-1.0, 1.0, 1000)
    codec = Int8BlockCodec()
    y = codec.decode(codec.encode(x), x.numel())
    assert y[0].item() == pytest.approx(-1.0, abs=1e-7)
    assert not torch.equal(y, x)


def test_int8_bound_is_per_block_not_global() -> None:
    # a huge value in block 0 must not wipe out the tiny values of block 1
    x = torch.full((2 * INT8_BLOCK,), 1e-3)
    x[0] = 1e3
    codec = Int8BlockCodec()
    y = codec.decode(codec.encode(x), x.numel())
    assert torch.allclose(y[INT8_BLOCK:], x[INT8_BLOCK:], rtol=0, atol=1e-3 / 254 * 1.001)


@pytest.mark.parametrize("numel", [1, 256, 257])
def test_int8_all_zero_decodes_to_zeros(numel: int) -> None:
    codec = Int8BlockCodec()
    y = codec.decode(codec.encode(torch.zeros(numel)), numel)
    assert torch.equal(y, torch.zeros(numel))
    assert not torch.isnan(y).any()


@settings(max_examples=200, deadline=None, database=None)
@given(
    arrays(
        np.float32,
        st.integers(1, 600),
        elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_int8_error_bound_holds_for_arbitrary_arrays(values: np.ndarray) -> None:
    x = torch.from_numpy(values.copy())
    codec = Int8BlockCodec()
    y = codec.decode(codec.encode(x), x.numel())
    assert torch.all((y - x).abs() <= _int8_bound(x))


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("numel", [0, *SIZES])
def test_encoded_bytes_matches_encode(name: str, numel: int) -> None:
    codec = get_codec(name)
    blob = codec.encode(torch.randn(numel))
    assert len(blob) == codec.encoded_bytes(numel)
    assert codec.decode(blob, numel).shape == (numel,)


def test_int8_size_includes_one_scale_per_block() -> None:
    codec = Int8BlockCodec()
    assert codec.encoded_bytes(256) == 4 + 256
    assert codec.encoded_bytes(257) == 8 + 257


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("delta", [-1, 1])
def test_decode_rejects_payload_of_wrong_size(name: str, delta: int) -> None:
    codec = get_codec(name)
    blob = codec.encode(torch.randn(300))
    bad = blob[:-1] if delta < 0 else blob + b"\x00"
    with pytest.raises(ProtocolError) as info:
        codec.decode(bad, 300)
    assert info.value.reason == "wrong_size"


def test_decode_checks_size_against_receivers_numel() -> None:
    # a sender claiming a bigger tensor cannot make the receiver read more than it expects
    codec = Fp32Codec()
    with pytest.raises(ProtocolError) as info:
        codec.decode(codec.encode(torch.zeros(1000)), 10)
    assert info.value.reason == "wrong_size"


def test_get_codec_known_and_unknown() -> None:
    assert isinstance(get_codec("int8"), Int8BlockCodec)
    assert get_codec("fp16").name == "fp16"
    with pytest.raises(ProtocolError) as info:
        get_codec("zip")
    assert info.value.reason == "unknown_codec"
    assert "fp32" in info.value.detail


def _feedback_run(rounds: int, delta: torch.Tensor, feedback: bool) -> tuple[torch.Tensor, list[float]]:
    codec = Int8BlockCodec()
    ef = ErrorFeedback(codec)
    total = torch.zeros_like(delta)
    norms = []
    for _ in range(rounds):
        if feedback:
            blob = ef.encode("w", delta)
            norms.append(ef.residual_norm())
        else:
            blob = codec.encode(delta)
        total += codec.decode(blob, delta.numel())
    return total, norms


def test_error_feedback_sum_tracks_true_sum() -> None:
    rounds = 200
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    true_sum = delta * rounds
    one_step_bound = _int8_bound(delta)

    with_fb, norms = _feedback_run(rounds, delta, feedback=True)
    without_fb, _ = _feedback_run(rounds, delta, feedback=False)

    err_fb = (with_fb - true_sum).abs()
    err_plain = (without_fb - true_sum).abs()
    # what is left over is at most one step's quantisation error (the last residual), with a
    # little slack: the residual can lift a block's absmax by up to a step
    assert torch.all(err_fb <= one_step_bound * 1.01 + 1e-7)
    # the residual does not grow over the rounds
    assert max(norms) <= float(one_step_bound.norm()) * 1.01 + 1e-6
    # without feedback the same error is repeated every round
    assert err_plain.sum() > 20 * err_fb.sum()


def test_error_feedback_residual_is_carried_and_reset() -> None:
    codec = Int8BlockCodec()
    ef = ErrorFeedback(codec)
    delta = torch.linspace(-1, 1, 300) ** 3
    blob = ef.encode("w", delta)
    expected = delta - codec.decode(blob, 300)
    assert ef.residual_norm() == pytest.approx(float(expected.norm()), rel=1e-5)
    assert ef.residual_norm() > 0
    ef.reset()
    assert ef.residual_norm() == 0.0
    # after a reset the next encode is the plain encoding again
    assert ef.encode("w", delta) == codec.encode(delta)


def test_error_feedback_keeps_tensors_apart() -> None:
    ef = ErrorFeedback(Int8BlockCodec())
    ef.encode("a", torch.linspace(0, 1, 300) ** 3)
    norm_a = ef.residual_norm()
    ef.encode("b", torch.zeros(10))
    assert ef.residual_norm() == pytest.approx(norm_a)


def test_error_feedback_is_a_no_op_for_fp32() -> None:
    ef = ErrorFeedback(Fp32Codec())
    delta = torch.randn(50)
    assert ef.encode("w", delta) == Fp32Codec().encode(delta)
    assert ef.residual_norm() == 0.0
