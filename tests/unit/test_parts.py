"""Deltas in parts: the part message, splitting, and the coordinator's spool (no servers)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.admission import RATE_BURST_DELTAS
from coordinator.intake import DeltaIntake
from coordinator.outer_optimizer import OuterConfig
from coordinator.parts import GiB, PartSpool, SpoolConfig, take_part
from shared import PROTOCOL_VERSION
from shared.codecs import get_codec
from shared.delta_parts import DeltaPart, DeltaSplit, split_delta
from shared.errors import ProtocolError
from shared.protocol import DELTA_ENVELOPE_BYTES, DeltaLimits, DeltaMessage, delta_bytes_bound
from tests.unit.test_intake import make_intake

RUN_ID = "unit-run"


def _parts(body: bytes, part_bytes: int = 7, client_id: str = "c1", seq: int = 0) -> list[DeltaPart]:
    return split_delta(body, part_bytes=part_bytes, run_id=RUN_ID, client_id=client_id, seq=seq)


def _reason(data: bytes, limits: DeltaLimits | None = None) -> str:
    with pytest.raises(ProtocolError) as err:
        DeltaPart.decode(data, limits or DeltaLimits())
    return err.value.reason


def _raw(**overrides: object) -> bytes:
    obj: dict[str, object] = {
        "protocol": PROTOCOL_VERSION, "type": "delta_part", "run_id": RUN_ID, "client_id": "c1",
        "seq": 3, "index": 0, "count": 2, "offset": 0, "total_bytes": 10,
        "sha256": b"\x00" * 32, "data": b"12345",
    }
    obj.update(overrides)
    return msgpack.packb({k: v for k, v in obj.items() if v is not None}, use_bin_type=True)


# ------------------------------------------------------------------ the message


@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=64))
@settings(max_examples=60, deadline=None)
def test_split_parts_decode_and_join_back_to_the_body(body: bytes, part_bytes: int) -> None:
    parts = _parts(body, part_bytes)
    assert len(parts) == -(-len(body) // part_bytes)
    decoded = [DeltaPart.decode(p.encode()) for p in parts]
    assert decoded == parts
    assert b"".join(p.data for p in decoded) == body
    assert all(p.sha256 == hashlib.sha256(body).digest() and p.total_bytes == len(body) for p in decoded)
    assert [p.offset for p in decoded] == list(range(0, len(body), part_bytes))


@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=64))
@settings(max_examples=60, deadline=None)
def test_a_split_made_part_by_part_gives_the_same_bytes(body: bytes, part_bytes: int) -> None:
    # what the uploader sends: each part made as it goes out, packed straight from the delta's bytes
    split = DeltaSplit.of(body, part_bytes=part_bytes, run_id=RUN_ID, client_id="c1", seq=0)
    parts = _parts(body, part_bytes)
    assert split.count == len(parts) and [split.part(i) for i in range(split.count)] == parts
    assert [split.encoded(i) for i in range(split.count)] == [p.encode() for p in parts]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"index": 2}, "bad_part"),  # index beyond count
        ({"index": -1}, "bad_part"),
        ({"offset": 6}, "bad_part"),  # 6 + 5 bytes > total 10
        ({"offset": -1}, "bad_part"),
        ({"data": b""}, "bad_part"),
        ({"count": 0}, "too_large"),
        ({"count": 5000}, "too_large"),
        ({"total_bytes": 0}, "too_large"),
        ({"total_bytes": 2**40}, "too_large"),
        ({"sha256": b"short"}, "wrong_schema"),
        ({"sha256": None}, "wrong_schema"),
        ({"seq": -1}, "wrong_schema"),
        ({"seq": True}, "wrong_schema"),
        ({"client_id": ""}, "wrong_schema"),
        ({"type": "delta"}, "wrong_schema"),
        ({"protocol": 99}, "protocol_version"),
    ],
)
def test_bad_part_headers_are_refused_with_a_reason(overrides: dict[str, object], reason: str) -> None:
    assert DeltaPart.decode(_raw()).data == b"12345"  # the unaltered part is fine
    assert _reason(_raw(**overrides)) == reason


def test_a_part_over_the_message_limit_is_refused() -> None:
    limits = DeltaLimits(max_message_bytes=200)
    assert _reason(_raw(data=b"x" * 300, total_bytes=400), limits) == "too_large"


# ------------------------------------------------------------------ the spool


def _spool(tmp_path: Path, **config: object) -> PartSpool:
    spool = PartSpool(tmp_path / "parts", SpoolConfig(**config))  # type: ignore[arg-type]
    assert spool.recover(0.0) == []
    return spool


def test_parts_in_any_order_assemble_to_the_delta(tmp_path: Path) -> None:
    body = bytes(range(256)) * 3
    parts = _parts(body, 50)
    random.Random(1).shuffle(parts)
    spool = _spool(tmp_path)
    kinds = [spool.add(p, now=1.0).kind for p in parts]
    assert kinds == ["spooled"] * (len(parts) - 1) + ["complete"]
    key = "c1~0"
    assert spool.assemble(key) == body
    assert spool.add(parts[0], now=2.0).kind == "duplicate"  # the delta is out of the spool's hands
    spool.discard(key)
    assert not (tmp_path / "parts" / key).exists() and spool.entries == {}
    assert spool.counts == {"parts_spooled": len(parts), "parts_duplicate": 1, "assembled": 1}


def test_a_repeated_part_is_a_duplicate_and_a_disagreeing_one_is_refused(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    first, second = _parts(b"0123456789abc", 7)
    assert spool.add(first, now=1.0).kind == "spooled"
    assert spool.add(first, now=1.0).kind == "duplicate"
    other = _parts(b"0123456789abX", 7)[1]  # same client and seq, other bytes: another hash
    result = spool.add(other, now=1.0)
    assert (result.kind, result.reason) == ("rejected", "part_mismatch")
    assert spool.add(second, now=1.0).kind == "complete"


def test_a_crash_leaves_the_spool_readable_by_the_next_process(tmp_path: Path) -> None:
    body_a, body_b = b"a" * 40, b"b" * 40
    spool = _spool(tmp_path)
    for part in _parts(body_a, 10, seq=1):
        spool.add(part, now=1.0)
    for part in _parts(body_b, 10, seq=2)[:2]:
        spool.add(part, now=1.0)
    (tmp_path / "parts" / "torn~9").mkdir()  # a first part's directory without its meta
    restarted = PartSpool(tmp_path / "parts", SpoolConfig())
    assert restarted.recover(now=50.0) == ["c1~1"]
    assert restarted.assemble("c1~1") == body_a
    assert sorted(restarted.entries["c1~2"].parts) == [0, 1]
    assert not (tmp_path / "parts" / "torn~9").exists()
    for part in _parts(body_b, 10, seq=2)[2:]:
        last = restarted.add(part, now=51.0)
    assert last.kind == "complete" and restarted.assemble("c1~2") == body_b


def test_parts_that_do_not_add_up_are_corrupt(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    parts = _parts(b"x" * 30, 10)
    for part in parts:
        spool.add(part, now=1.0)
    (tmp_path / "parts" / "c1~0" / "10@1.part").write_bytes(b"y" * 10)  # flipped on disk
    with pytest.raises(ProtocolError) as err:
        spool.assemble("c1~0")
    assert err.value.reason == "parts_corrupt"


def test_the_spool_bounds_bytes_and_pending_deltas_per_client(tmp_path: Path) -> None:
    spool = _spool(tmp_path, max_bytes=100, max_pending_per_client=2)
    assert spool.add(_parts(b"a" * 60, 10, seq=0)[0], now=1.0).kind == "spooled"
    # a second delta of 60 bytes would reserve 120 > 100
    result = spool.add(_parts(b"b" * 60, 10, client_id="c2")[0], now=1.0)
    assert (result.kind, result.reason) == ("rejected", "spool_full")
    assert spool.add(_parts(b"c" * 20, 10, seq=1)[0], now=1.0).kind == "spooled"
    result = spool.add(_parts(b"d" * 10, 10, seq=2)[0], now=1.0)
    assert (result.kind, result.reason) == ("rejected", "too_many_pending")
    # the deltas already started can always finish
    for part in _parts(b"a" * 60, 10, seq=0)[1:]:
        last = spool.add(part, now=1.0)
    assert last.kind == "complete"


def test_incomplete_deltas_expire_after_their_newest_part(tmp_path: Path) -> None:
    spool = _spool(tmp_path, timeout_s=10.0)
    parts = _parts(b"z" * 30, 10)
    spool.add(parts[0], now=100.0)
    spool.add(parts[1], now=105.0)
    assert spool.expire(now=114.0) == []  # 9 s after the newest part
    expired = spool.expire(now=116.0)
    assert [(e.client_id, e.seq, len(e.parts), e.count) for e in expired] == [("c1", 0, 2, 3)]
    assert spool.entries == {} and list((tmp_path / "parts").iterdir()) == []
    assert spool.counts["incomplete"] == 1


# ------------------------------------------------------------------ with the intake


def _intake() -> DeltaIntake:
    plain = OuterConfig(lr=1.0, momentum=0.0, buffer_size=1, compute_exponent=0.0)
    intake, _ = make_intake({"w": torch.ones(300)}, plain, version=2)
    return intake


def _delta_body(seq: int = 0) -> bytes:
    codec = get_codec("fp32")
    return DeltaMessage(
        run_id=RUN_ID, client_id="c1", seq=seq, base_version=2, local_steps=5, samples=10, tokens=100,
        compute_s=1.0, train_loss=2.0, codec="fp32", tensors={"w": codec.encode(torch.full((300,), 0.1))},
    ).encode()


def test_take_part_spools_completes_and_the_assembled_delta_applies_once(tmp_path: Path) -> None:
    intake, spool = _intake(), _spool(tmp_path)
    body = _delta_body()
    parts = [p.encode() for p in _parts(body, 256)]
    results = [take_part(spool, intake, raw, now=1.0) for raw in parts]
    assert [o.kind for o, _ in results] == ["spooled"] * (len(parts) - 1) + ["complete"]
    key = results[-1][1]
    assert key == "c1~0" and all(k == "" for _, k in results[:-1])
    assert intake.handle(spool.assemble(key), parts_of=("c1", 0)).kind == "applied"
    torch.testing.assert_close(intake.params["w"], torch.full((300,), 0.9))
    spool.discard(key)
    outcome, key = take_part(spool, intake, parts[0], now=2.0)  # a redelivered part, later
    assert (outcome.kind, key) == ("duplicate", "")
    assert spool.entries == {} and intake.counts == {"applied": 1}


def test_a_refused_part_dooms_its_delta_once(tmp_path: Path) -> None:
    intake, spool = _intake(), _spool(tmp_path)
    assert intake.handle(_delta_body(seq=0)).kind == "applied"  # c1 is a known client now
    good = _parts(_delta_body(seq=1), 256, seq=1)
    assert take_part(spool, intake, good[0].encode(), now=1.0)[0].kind == "spooled"
    forged = _parts(_delta_body(seq=1)[:-1] + b"!", 256, seq=1)[1]
    outcome, _ = take_part(spool, intake, forged.encode(), now=1.0)
    assert (outcome.kind, outcome.reason, outcome.delta_id) == ("rejected", "part_mismatch", "c1:1")
    assert spool.entries == {}  # the delta is gone, its seq settled as rejected
    assert take_part(spool, intake, good[1].encode(), now=1.0)[0].kind == "duplicate"
    assert intake.rejected_by_reason == {"part_mismatch": 1}
    wrong_run = split_delta(b"x" * 10, part_bytes=5, run_id="other", client_id="c1", seq=7)[0]
    assert take_part(spool, intake, wrong_run.encode(), now=1.0)[0].reason == "wrong_run"
    assert take_part(spool, intake, b"\xc1", now=1.0)[0].reason == "undecodable"
    torch.testing.assert_close(intake.params["w"], torch.full((300,), 0.9))  # unmoved


# ------------------------------------------------------------------ bounds per identity (a stranger's parts)


def _header_part(client_id: str, seq: int, total_bytes: int, count: int = 4) -> DeltaPart:
    """The first of ``count`` parts of a delta that declares ``total_bytes`` but sends one byte."""
    return DeltaPart(run_id=RUN_ID, client_id=client_id, seq=seq, index=0, count=count, offset=0,
                     total_bytes=total_bytes, sha256=b"\x01" * 32, data=b"x")


def test_the_bound_is_what_this_models_delta_can_encode_to() -> None:
    numels = {"w": 300, "layer.bias": 7}
    bound = delta_bytes_bound(numels)
    # fp32's 4 bytes per element is the largest payload; then the names and the envelope
    assert bound == 4 * 307 + (len("w") + 16) + (len("layer.bias") + 16) + DELTA_ENVELOPE_BYTES
    assert len(_delta_body()) < delta_bytes_bound({"w": 300})  # a real delta fits, with room


def test_four_one_byte_parts_declaring_a_gib_each_are_refused_too_large(tmp_path: Path) -> None:
    intake, spool = _intake(), _spool(tmp_path)
    for seq in range(4):
        outcome, _ = take_part(spool, intake, _header_part("mallory", seq, GiB).encode(), now=1.0)
        assert (outcome.kind, outcome.reason) == ("rejected", "too_large"), outcome
    assert spool.entries == {} and spool.reserved_bytes == 0
    assert intake.rejected_by_reason == {"too_large": 4}
    # so an honest big delta still finds room
    results = [take_part(spool, intake, p.encode(), now=2.0) for p in _parts(_delta_body(), 256)]
    assert results[-1][0].kind == "complete"


def test_a_client_cannot_hold_more_than_its_quota(tmp_path: Path) -> None:
    intake, spool = _intake(), _spool(tmp_path)
    bound = delta_bytes_bound(intake.numels)  # the default quota is twice this
    for seq in range(2):
        outcome, _ = take_part(spool, intake, _header_part("mallory", seq, bound).encode(), now=1.0)
        assert outcome.kind == "spooled"
    outcome, _ = take_part(spool, intake, _header_part("mallory", 2, 10).encode(), now=1.0)
    assert (outcome.kind, outcome.reason) == ("rejected", "spool_quota")
    assert spool.reserved_bytes == 2 * bound  # its two deltas hold their room, nobody else's is taken
    assert take_part(spool, intake, _header_part("alice", 0, bound).encode(), now=1.0)[0].kind == "spooled"
    small = PartSpool(tmp_path / "small", SpoolConfig(client_quota_bytes=100))
    small.recover(0.0)
    assert small.add(_header_part("c1", 0, 60), now=1.0).kind == "spooled"
    assert small.add(_header_part("c1", 1, 60), now=1.0).reason == "spool_quota"
    assert small.add(_header_part("c2", 0, 60), now=1.0).kind == "spooled"


def test_a_delta_trickling_in_past_the_absolute_deadline_is_discarded(tmp_path: Path) -> None:
    spool = _spool(tmp_path, timeout_s=10.0, deadline_s=30.0)
    parts = _parts(b"t" * 100, 10)
    for i, part in enumerate(parts[:7]):  # one part every 5 s: never 10 s without one
        assert spool.add(part, now=100.0 + 5 * i).kind == "spooled"
        assert spool.expire(now=100.0 + 5 * i) == []  # up to 130 s after the first: within the deadline
    (entry,) = spool.expire(now=130.5)
    assert (entry.client_id, entry.seq) == ("c1", 0) and "deadline" in entry.expired
    assert spool.entries == {} and spool.counts["incomplete"] == 1
    assert not (tmp_path / "parts" / "c1~0").exists()


def test_the_deadline_survives_a_restart(tmp_path: Path) -> None:
    spool = _spool(tmp_path, timeout_s=1000.0, deadline_s=30.0)
    spool.add(_parts(b"r" * 40, 10)[0], now=100.0)
    restarted = PartSpool(tmp_path / "parts", SpoolConfig(timeout_s=1000.0, deadline_s=30.0))
    restarted.recover(now=120.0)
    assert restarted.entries["c1~0"].first_at == 100.0
    assert [e.key for e in restarted.expire(now=131.0)] == ["c1~0"]


def test_a_delta_in_parts_costs_one_rate_token_at_its_first_part(tmp_path: Path) -> None:
    intake = _intake()
    spool = _spool(tmp_path, max_pending_per_client=64)
    starts = [_parts(bytes([seq]) * 30, 10, seq=seq) for seq in range(RATE_BURST_DELTAS + 1)]
    for parts in starts[:RATE_BURST_DELTAS]:
        assert take_part(spool, intake, parts[0].encode(), now=1.0)[0].kind == "spooled"
    outcome, _ = take_part(spool, intake, starts[-1][0].encode(), now=1.0)
    assert (outcome.kind, outcome.reason) == ("rejected", "rate_limited")
    for parts in starts[:RATE_BURST_DELTAS]:  # their later parts cost nothing
        kinds = [take_part(spool, intake, p.encode(), now=1.0)[0].kind for p in parts[1:]]
        assert kinds == ["spooled", "complete"]
