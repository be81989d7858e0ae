"""Wire messages: round trips, and every way a hostile body is refused with its reason slug."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import PROTOCOL_VERSION
from shared.errors import ProtocolError
from shared.protocol import (
    DELTA_ENVELOPE_BYTES,
    DEVICE_MAX_CHARS,
    ROUND_TIMINGS,
    TENSOR_ENVELOPE_BYTES,
    TIMING_MAX_S,
    DeltaLimits,
    DeltaMessage,
    device_label,
    round_timings,
)
from shared.round_plan import RoundMode, RoundPlan


def make_delta(**changes: Any) -> DeltaMessage:
    fields: dict[str, Any] = dict(
        run_id="run-7f3a",
        client_id="client-1",
        seq=3,
        base_version=12,
        local_steps=50,
        samples=800,
        tokens=102_400,
        compute_s=4.25,
        train_loss=2.5,
        codec="int8",
        tensors={"tok.weight": b"\x01\x02\x03", "ln_f.bias": b""},
        sent_at=1_700_000_000.5,
        device="cuda: NVIDIA H200",
    )
    fields.update(changes)
    return DeltaMessage(**fields)


def delta_dict(**changes: Any) -> dict[str, Any]:
    """The decoded map of a valid delta, with ``changes`` applied (a value of ... deletes)."""
    obj = msgpack.unpackb(make_delta().encode(), raw=False)
    for key, value in changes.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return obj


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def reason_of(data: Any, limits: DeltaLimits | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        if limits is None:
            DeltaMessage.decode(data)
        else:
            DeltaMessage.decode(data, limits)
    return info.value.reason


def test_delta_round_trip() -> None:
    msg = make_delta()
    decoded = DeltaMessage.decode(msg.encode())
    assert decoded == msg
    assert decoded.tensors == msg.tensors
    assert decoded.delta_id == "client-1:3"


def test_delta_round_trip_with_integral_floats() -> None:
    # ints are accepted where floats are meant, and come back as floats
    decoded = DeltaMessage.decode(pack(delta_dict(compute_s=3, sent_at=0)))
    assert decoded.compute_s == 3.0 and isinstance(decoded.compute_s, float)


def test_a_delta_without_a_device_decodes_with_none_reported() -> None:
    # a client that predates the field sends no "device": its deltas decode as before
    decoded = DeltaMessage.decode(pack(delta_dict(device=...)))
    assert decoded.device == "" and decoded == make_delta(device="")
    assert DeltaMessage.decode(make_delta(device="").encode()).device == ""


@pytest.mark.parametrize("device", ["cpu (8 threads)", "mps", "cuda: NVIDIA GeForce RTX 4090 — 24 GB",
                                    "d" * DEVICE_MAX_CHARS])
def test_the_device_label_round_trips(device: str) -> None:
    assert DeltaMessage.decode(make_delta(device=device).encode()).device == device


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("d" * (DEVICE_MAX_CHARS + 1), "too_large"),  # over the field's own limit
        ("d" * 300, "too_large"),  # over every string's limit: refused by the unpacker itself
        ("\x1b[2J\x1b[31mcuda", "wrong_schema"),  # terminal escapes for the operator's `status`
        ("cpu\nclient-2 yes", "wrong_schema"),  # a forged line in the status table
        ("cuda\u202e", "wrong_schema"),  # a bidi override (a format character)
        ("cpu\x00", "wrong_schema"),
        (17, "wrong_schema"),
        (b"cpu", "wrong_schema"),
        (None, "wrong_schema"),
        (["cpu"], "wrong_schema"),
    ],
)
def test_a_bad_device_label_refuses_the_delta(device: Any, reason: str) -> None:
    assert reason_of(pack(delta_dict(device=device))) == reason


def test_device_label_keeps_printable_characters_and_cuts_to_the_limit() -> None:
    assert device_label("  \x1b[31mcuda:\tNVIDIA\u202e H200\n") == "[31mcuda:NVIDIA H200"
    assert device_label("x" * 500) == "x" * DEVICE_MAX_CHARS
    assert device_label("\x00\x07") == ""


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=200))
def test_whatever_device_label_returns_the_decoder_accepts(text: str) -> None:
    label = device_label(text)
    assert len(label) <= DEVICE_MAX_CHARS and label.isprintable()
    assert DeltaMessage.decode(make_delta(device=label).encode()).device == label


TIMINGS = {"fetch_s": 0.25, "encode_s": 0.125, "upload_s": 1.5, "wait_s": 3.0}


@pytest.mark.parametrize("name", ["stacked_on", "origin_version"])
def test_a_stacked_or_moved_round_says_so_and_others_leave_the_field_out(name: str) -> None:
    assert getattr(DeltaMessage.decode(make_delta(**{name: 41}).encode()), name) == 41
    assert name not in msgpack.unpackb(make_delta().encode(), raw=False)
    assert getattr(DeltaMessage.decode(make_delta().encode()), name) == -1
    for bad in (-2, 2**63, True, 1.0, "3"):
        assert reason_of(pack(delta_dict(**{name: bad}))) == "wrong_schema", bad


def test_the_previous_rounds_timings_round_trip() -> None:
    decoded = DeltaMessage.decode(make_delta(previous_timings=TIMINGS).encode())
    assert decoded.previous_timings == TIMINGS and decoded == make_delta(previous_timings=TIMINGS)
    ints = DeltaMessage.decode(pack(delta_dict(previous_timings={n: 2 for n in ROUND_TIMINGS})))
    assert ints.previous_timings == dict.fromkeys(ROUND_TIMINGS, 2.0)
    assert all(isinstance(v, float) for v in ints.previous_timings.values())


def test_timings_are_optional_both_ways() -> None:
    # a client that predates them (or in its first round) sends none: its deltas decode as before
    assert "previous_timings" not in delta_dict()  # none said: the key is left out, not sent empty
    assert DeltaMessage.decode(make_delta().encode()).previous_timings == {}
    # a coordinator that predates them reads its named fields only: with the timings, a delta holds
    # every one of them unchanged, and one more key it never looks at
    with_timings = msgpack.unpackb(make_delta(previous_timings=TIMINGS).encode(), raw=False)
    assert with_timings.pop("previous_timings") == TIMINGS and with_timings == delta_dict()


@pytest.mark.parametrize(
    "timings",
    [
        {**TIMINGS, "wait_s": -0.001},
        {**TIMINGS, "fetch_s": float("nan")},
        {**TIMINGS, "upload_s": float("inf")},
        {**TIMINGS, "encode_s": TIMING_MAX_S + 1},
        {**TIMINGS, "wait_s": True},
        {**TIMINGS, "wait_s": "1.0"},
        {**TIMINGS, "wait_s": None},
        {n: v for n, v in TIMINGS.items() if n != "wait_s"},  # one missing
        {**TIMINGS, "compute_s": 1.0},  # one that is not a timing
        {},
        [0.25, 0.125, 1.5, 3.0],
        3.0,
    ],
)
def test_bad_timings_refuse_the_delta(timings: Any) -> None:
    assert reason_of(pack(delta_dict(previous_timings=timings))) == "wrong_schema"


def test_timings_keyed_by_bytes_refuse_the_delta() -> None:
    body = pack(delta_dict(previous_timings={n.encode(): v for n, v in TIMINGS.items()}))
    assert reason_of(body) == "wrong_schema"


def test_round_timings_cuts_each_value_to_what_the_decoder_accepts() -> None:
    made = round_timings(fetch_s=-1.0, encode_s=float("nan"), upload_s=TIMING_MAX_S * 2, wait_s=2.5)
    assert made == {"fetch_s": 0.0, "encode_s": 0.0, "upload_s": TIMING_MAX_S, "wait_s": 2.5}
    assert round_timings(fetch_s=float("inf"), encode_s=0, upload_s=0, wait_s=0)["fetch_s"] == 0.0
    assert list(made) == list(ROUND_TIMINGS)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4))
def test_whatever_round_timings_returns_the_decoder_accepts(values: list[float]) -> None:
    made = round_timings(**dict(zip(ROUND_TIMINGS, values, strict=True)))
    assert DeltaMessage.decode(make_delta(previous_timings=made).encode()).previous_timings == made


def test_the_envelope_bound_holds_the_longest_ids_and_device() -> None:
    # delta_bytes_bound (the parts' quota) counts on DELTA_ENVELOPE_BYTES for everything but payloads
    tensors = {"w": b"\x00" * 10}
    longest = make_delta(run_id="r" * 128, client_id="c" * 128, codec="k" * 128, seq=2**63 - 1,
                         device="\U0001f680" * DEVICE_MAX_CHARS, tensors=tensors,  # 4 bytes a char
                         previous_timings=dict.fromkeys(ROUND_TIMINGS, TIMING_MAX_S))
    payloads = sum(len(name.encode()) + TENSOR_ENVELOPE_BYTES + len(b) for name, b in tensors.items())
    assert len(longest.encode()) - payloads <= DELTA_ENVELOPE_BYTES


def test_delta_decode_accepts_bytearray_and_memoryview() -> None:
    data = make_delta().encode()
    assert DeltaMessage.decode(bytearray(data)) == make_delta()
    assert DeltaMessage.decode(memoryview(data)) == make_delta()


def test_round_plan_round_trip() -> None:
    plan = RoundPlan(
        run_id="r",
        local_steps=100,
        min_local_steps=10,
        fastest_steps_per_s=12.5,
        active_clients=4,
        mode=RoundMode.FIXED,
        updated_at=123.0,
    )
    assert RoundPlan.decode(plan.encode()) == plan


def test_round_plan_carries_a_bounded_grace_period() -> None:
    plan = RoundPlan(run_id="r", local_steps=5, min_local_steps=1, fastest_steps_per_s=1.0, active_clients=2,
                     grace_s=1.25)
    assert RoundPlan.decode(plan.encode()).grace_s == 1.25
    fields = msgpack.unpackb(plan.encode())
    del fields["grace_s"]  # a plan from a coordinator without grace periods: start at once
    assert RoundPlan.decode(msgpack.packb(fields)).grace_s == 0.0
    for bad in (-1.0, 1e9, "soon"):
        with pytest.raises(ProtocolError) as info:
            RoundPlan.decode(msgpack.packb({**fields, "grace_s": bad}))
        assert info.value.reason == "wrong_schema"


def test_round_plan_carries_the_runs_delta_queues() -> None:
    plan = RoundPlan(run_id="r", local_steps=5, min_local_steps=1, fastest_steps_per_s=1.0, active_clients=2,
                     delta_queues=4)
    assert RoundPlan.decode(plan.encode()).delta_queues == 4
    fields = msgpack.unpackb(plan.encode())
    del fields["delta_queues"]  # a coordinator of one queue
    assert RoundPlan.decode(msgpack.packb(fields)).delta_queues == 1
    for bad in (0, -1, 17, 2**40, "4", True):
        with pytest.raises(ProtocolError) as info:
            RoundPlan.decode(msgpack.packb({**fields, "delta_queues": bad}))
        assert info.value.reason == "wrong_schema"


@pytest.mark.parametrize("mode", list(RoundMode))
def test_round_plan_carries_its_mode(mode: RoundMode) -> None:
    plan = RoundPlan(run_id="r", local_steps=5, min_local_steps=1, fastest_steps_per_s=1.0, active_clients=2,
                     mode=mode, warm_client="w" if mode is RoundMode.WARM_START else "")
    assert RoundPlan.decode(plan.encode()).mode is mode


def test_round_plan_rejects_an_unknown_mode() -> None:
    fields = msgpack.unpackb(RoundPlan(run_id="r", local_steps=5, min_local_steps=1, fastest_steps_per_s=1.0,
                                       active_clients=1).encode())
    with pytest.raises(ProtocolError) as info:
        RoundPlan.decode(msgpack.packb({**fields, "mode": "turbo"}))
    assert info.value.reason == "wrong_schema"


def test_round_plan_rejects_bad_step_bounds() -> None:
    plan = RoundPlan(run_id="r", local_steps=5, min_local_steps=10, fastest_steps_per_s=1.0, active_clients=1)
    with pytest.raises(ProtocolError) as info:
        RoundPlan.decode(plan.encode())
    assert info.value.reason == "wrong_schema"


def test_round_plan_is_not_a_delta_and_back() -> None:
    plan = RoundPlan(run_id="r", local_steps=5, min_local_steps=1, fastest_steps_per_s=1.0, active_clients=1)
    assert reason_of(plan.encode()) == "wrong_schema"
    with pytest.raises(ProtocolError) as info:
        RoundPlan.decode(make_delta().encode())
    assert info.value.reason == "wrong_schema"


def test_empty_body() -> None:
    assert reason_of(b"") == "empty"


def test_body_that_is_not_bytes() -> None:
    assert reason_of("a string") == "undecodable"


@pytest.mark.parametrize("data", [b"\xc1", b"\xff" * 7 + b"\x00garbage", b"\xc1\x85\xa3abc"])
def test_random_bytes(data: bytes) -> None:
    assert reason_of(data) == "undecodable"


@pytest.mark.parametrize("cut", [1, 10, 50, -1])
def test_truncated_message(cut: int) -> None:
    assert reason_of(make_delta().encode()[:cut]) == "truncated"


def test_map_that_ends_early_is_truncated() -> None:
    assert reason_of(b"\x85\xa3abc") == "truncated"  # a map of 5 pairs, one key sent


def test_trailing_bytes() -> None:
    assert reason_of(make_delta().encode() + b"\x00") == "undecodable"


@pytest.mark.parametrize("top", [[1, 2, 3], "delta", 42, None])
def test_top_level_not_a_map(top: Any) -> None:
    assert reason_of(pack(top)) == "wrong_schema"


@pytest.mark.parametrize(
    "name", ["protocol", "seq", "base_version", "client_id", "codec", "tensors", "compute_s", "sent_at"]
)
def test_missing_field(name: str) -> None:
    assert reason_of(pack(delta_dict(**{name: ...}))) == "wrong_schema"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seq", "3"),
        ("seq", 3.0),
        ("seq", True),  # bool is an int subclass, but never an int here
        ("local_steps", False),
        ("protocol", True),
        ("compute_s", True),
        ("compute_s", "4.2"),
        ("client_id", 17),
        ("client_id", b"client-1"),
        ("tensors", [b"\x00"]),
        ("type", "plan"),
    ],
)
def test_wrong_field_type(name: str, value: Any) -> None:
    assert reason_of(pack(delta_dict(**{name: value}))) == "wrong_schema"


@pytest.mark.parametrize("name", ["seq", "base_version", "local_steps", "samples", "tokens"])
def test_negative_counts(name: str) -> None:
    assert reason_of(pack(delta_dict(**{name: -1}))) == "wrong_schema"


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_bad_compute_time(value: float) -> None:
    assert reason_of(pack(delta_dict(compute_s=value))) == "wrong_schema"


@pytest.mark.parametrize(("name", "value", "reason"),
                         [("client_id", "", "wrong_schema"), ("run_id", "x" * 129, "too_large")])
def test_empty_or_long_ids(name: str, value: str, reason: str) -> None:
    assert reason_of(pack(delta_dict(**{name: value}))) == reason


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**40])
def test_wrong_protocol_version(version: int) -> None:
    assert reason_of(pack(delta_dict(protocol=version))) == "protocol_version"


@pytest.mark.parametrize(
    "ext", [msgpack.ExtType(5, b"abc"), msgpack.ExtType(5, b""), msgpack.Timestamp(1_700_000_000)]
)
def test_ext_types_are_refused(ext: Any) -> None:
    # includes a zero-length ext and a msgpack timestamp (ext -1)
    assert reason_of(pack(delta_dict(client_id=ext))) == "ext_type"
    assert reason_of(pack(delta_dict(tensors={"w": ext}))) == "ext_type"


def test_oversized_body() -> None:
    limits = DeltaLimits(max_message_bytes=1024)
    big = make_delta(tensors={"w": b"\x00" * 2000})
    assert reason_of(big.encode(), limits) == "too_large"
    # the same limits accept a small message
    assert DeltaMessage.decode(make_delta().encode(), limits) == make_delta()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\xdd\x80\x00\x00\x00", "too_large"),  # array32 of 2**31 items: over max_array_len
        (b"\xdf\x80\x00\x00\x00", "too_large"),  # map32 of 2**31 pairs: over max_map_len
        (b"\xdb\x80\x00\x00\x00", "truncated"),  # str32 of 2**31 bytes: more than the body holds
        (b"\xc6\xff\xff\xff\xff", "truncated"),  # bin32 of 4 GiB - 1 bytes: likewise
    ],
)
def test_huge_length_header_without_data(header: bytes, reason: str) -> None:
    assert reason_of(header) == reason
    # nested inside a valid-looking map as well
    assert reason_of(b"\x81\xa7tensors" + header) == reason  # {"tensors": ...}


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"])  # [ ... ] and {"k": ...}
def test_deeply_nested_containers(opener: bytes) -> None:
    assert reason_of(opener * 10_000 + b"\xc0") == "too_deep"


def test_tensor_payload_not_bytes() -> None:
    for payload in ["abc", 12, [1, 2], None]:
        assert reason_of(pack(delta_dict(tensors={"w": payload}))) == "wrong_schema"


def test_tensor_name_not_a_string() -> None:
    assert reason_of(pack(delta_dict(tensors={b"w": b"\x00"}))) == "wrong_schema"
    # an int key is refused by the unpacker itself (strict_map_key)
    assert reason_of(pack(delta_dict(tensors={1: b"\x00"}))) == "undecodable"


def test_no_tensors() -> None:
    assert reason_of(pack(delta_dict(tensors={}))) == "wrong_schema"


def test_too_many_tensors() -> None:
    limits = DeltaLimits(max_tensors=2)
    three = make_delta(tensors={f"p{i}": b"\x00" for i in range(3)})
    assert reason_of(three.encode(), limits) == "too_large"
    two = make_delta(tensors={f"p{i}": b"\x00" for i in range(2)})
    assert DeltaMessage.decode(two.encode(), limits) == two
    # far more than the limit is stopped by the unpacker before any map is built
    many = make_delta(tensors={f"p{i}": b"" for i in range(100)})
    assert reason_of(many.encode(), limits) == "too_large"


def test_tensor_name_too_long() -> None:
    limits = DeltaLimits(max_name_chars=300)
    # refused by the unpacker's string limit already, or by the name check: too_large either way
    assert reason_of(make_delta(tensors={"n" * 301: b""}).encode(), limits) == "too_large"
    assert DeltaMessage.decode(make_delta(tensors={"n" * 300: b""}).encode(), limits).tensors


def test_delta_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_delta().seq = 4  # type: ignore[misc]


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=512))
def test_decode_of_arbitrary_bytes_only_raises_protocol_error(data: bytes) -> None:
    try:
        assert isinstance(DeltaMessage.decode(data), DeltaMessage)
    except ProtocolError:
        pass


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(sorted(delta_dict())), _msgpack_values, max_size=6))
def test_decode_of_mutated_deltas_only_raises_protocol_error(changes: dict[str, Any]) -> None:
    # valid msgpack, close to a real delta: reaches the field checks rather than the unpacker
    try:
        msg = DeltaMessage.decode(pack(delta_dict(**changes)))
    except ProtocolError:
        return
    assert isinstance(msg, DeltaMessage)
    assert msg.seq >= 0 and msg.tensors and all(isinstance(b, bytes) for b in msg.tensors.values())


_VALID = make_delta(tensors={"tok.weight": bytes(range(64)), "ln_f.bias": b"\x00" * 8}).encode()

_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(_VALID) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(_VALID) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(_VALID)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(_VALID) - 1), st.just(0)),
)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in edits:
        pos = min(pos, len(out))
        if op == "flip" and pos < len(out):
            out[pos] ^= value  # value >= 1: the byte really changes
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out.insert(pos, value)
        elif op == "delete" and pos < len(out):
            del out[pos]
    return bytes(out)


@settings(max_examples=1000, deadline=None, database=None)
@given(st.lists(_edits, min_size=1, max_size=4))
def test_decode_of_byte_mutated_valid_delta_only_raises_protocol_error(
    edits: list[tuple[str, int, int]],
) -> None:
    # flips, truncations, insertions and deletions of a valid encoded delta's bytes: decode returns
    # a DeltaMessage or raises ProtocolError with a known reason, never anything else
    data = _mutate(_VALID, edits)
    try:
        msg = DeltaMessage.decode(data)
    except ProtocolError as exc:
        assert exc.reason in {"empty", "truncated", "undecodable", "too_large", "too_deep", "ext_type",
                              "wrong_schema", "protocol_version"}
        return
    assert isinstance(msg, DeltaMessage)
    assert all(isinstance(b, bytes) for b in msg.tensors.values())
    assert msg.seq >= 0 and msg.compute_s >= 0


def test_every_single_byte_truncation_of_a_valid_delta_is_truncated() -> None:
    # a cut anywhere inside the message is reported as such, not as garbage
    assert {reason_of(_VALID[:cut]) for cut in range(1, len(_VALID))} == {"truncated"}
