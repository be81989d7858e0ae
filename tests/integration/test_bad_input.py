"""Hostile deltas through RabbitMQ into ONE real coordinator: each refused with its own reason.

One coordinator (in a thread, on the real Redis and RabbitMQ) serves the whole module. Every kind
of bad input below is published to its delta queue like a client would, and for each the test
checks what an operator would see and what must never happen:

- the status document in Redis counts it under the one expected ``deltas.rejected_by_reason``
  bucket (and nowhere else);
- the model's parameters are bit-for-bit what they were before it arrived;
- the dead-letter queue holds the very same bytes with header ``x-asyncloco-reason``.

At the end an honest fp32 delta is still applied: bad input never stops the service.

Why there is no "decompression bomb" here: asyncloco never compresses a payload (the codecs are
fixed-size fp32/fp16/int8 layouts whose exact byte length follows from the coordinator's own
manifest), so there is nothing to inflate. The same class of attack in msgpack form is a small
message whose length headers *declare* a huge array, map, str or bin. The unpacker refuses those
before allocating anything: array/map headers above ``max_items`` are ``too_large`` at the
header, and a str/bin header claiming more bytes than the body holds (``declares 4 GiB`` below,
a few hundred bytes on the wire) is ``truncated``, because ``msgpack.unpackb`` only ever slices
the buffer it was given. The body itself is bounded by ``DeltaLimits.max_message_bytes`` before
the unpacker runs, so nothing in a delta can make the coordinator hold more than that.
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pika
import pytest
import redis
import torch

import coordinator.registry as registry_module
from coordinator.config import CommitConfig, CoordinatorConfig
from coordinator.identity import AuthMode
from coordinator.intake import IntakeConfig
from coordinator.service import Coordinator
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared import PROTOCOL_VERSION
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.protocol import DELTA_ENVELOPE_BYTES, DeltaLimits, DeltaMessage
from shared.settings import ConnectionSettings
from shared.snapshot import SnapshotStore
from shared.tasks import load_task
from tests.services import MADE_UP_DELTAS_GUARD, run_scope, serving

pytestmark = pytest.mark.integration

TASK = {"model_size": "tiny", "batch_size": 4, "eval_sequences": 4, "max_corpus_bytes": 1_000_000}
MAX_STALENESS = 1
# The registry remembers SEQ_WINDOW applied seqs per client (4096). A seq below that window is
# "replayed"; reaching it honestly takes 4097 applied deltas, so the module shrinks the window.
SEQ_WINDOW = 4
HOSTILE = "mallory"


@dataclass
class Served:
    """The module's running coordinator and what a sender needs to know about it."""

    coord: Coordinator
    run: str
    keys: RunKeys
    redis: redis.Redis
    limits: DeltaLimits
    numels: dict[str, int]
    # hostile deltas refused by this process's coordinator (under xdist the module's tests, and
    # so its module-scoped coordinator, can be split between processes)
    refused: int = 0

    def status(self) -> dict[str, Any]:
        raw = self.redis.get(self.keys.status)
        return json.loads(raw) if raw else {}

    def publish(self, body: bytes) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", self.keys.delta_queue, body,
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)
        finally:
            connection.close()

    def take_dead_letters(self, count: int, timeout_s: float = 10.0) -> list[tuple[dict, bytes]]:
        """Take exactly ``count`` dead letters (waiting for them), and check none more are there."""
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        got: list[tuple[dict, bytes]] = []
        try:
            channel = connection.channel()
            deadline = time.monotonic() + timeout_s
            while len(got) < count and time.monotonic() < deadline:
                method, props, body = channel.basic_get(self.keys.dead_letter_queue, auto_ack=True)
                if method is None:
                    time.sleep(0.05)
                    continue
                got.append((props.headers or {}, body))
            method, _, _ = channel.basic_get(self.keys.dead_letter_queue, auto_ack=True)
            assert method is None, "more dead letters than rejected deltas"
        finally:
            connection.close()
        assert len(got) == count, f"expected {count} dead letters, got {len(got)}"
        return got

    def fields(self, *, encoding: str = "fp16", scale: float = 1e-3, **changes: Any) -> dict[str, Any]:
        """The fields of an honest delta (tensors ``scale``·randn encoded with ``encoding``) against
        the current snapshot, with ``changes`` applied (a value of ``...`` deletes the field)."""
        snap = SnapshotStore(self.redis, self.keys).read_latest()
        enc = get_codec(encoding)
        gen = torch.Generator().manual_seed(1234)
        tensors = {e.name: enc.encode(scale * torch.randn(e.numel, generator=gen))
                   for e in snap.manifest.params}
        obj = msgpack.unpackb(DeltaMessage(
            run_id=snap.manifest.run_id, client_id=HOSTILE, seq=1, base_version=snap.version,
            local_steps=10, samples=40, tokens=5160, compute_s=1.0, train_loss=3.0, codec=encoding,
            tensors=tensors, sent_at=time.time(),
        ).encode(), raw=False)
        for key, value in changes.items():
            if value is ...:
                del obj[key]
            else:
                obj[key] = value
        return obj

    def honest(self, *, client_id: str, seq: int, encoding: str = "fp16") -> bytes:
        return pack(self.fields(client_id=client_id, seq=seq, encoding=encoding))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def params_bits(coord: Coordinator) -> dict[str, torch.Tensor]:
    """The parameters' raw bits (int32 views of the fp32 tensors): equality is bit-for-bit."""
    return {n: p.detach().clone().view(torch.int32) for n, p in coord.run.optimizer.params.items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert not changed, f"parameters changed: {changed[:5]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Start one coordinator for the module; apply a few honest deltas so versions have moved."""
    task = load_task("bytelm", TASK)
    params = dict(task.build_model().named_parameters())
    numels = {n: p.numel() for n, p in params.items()}
    # Small enough that an oversized body is cheap, big enough for an honest fp32 delta.
    fp32_bytes = 4 * sum(numels.values()) + sum(len(n) + 8 for n in numels)
    limits = DeltaLimits(max_message_bytes=fp32_bytes + DELTA_ENVELOPE_BYTES)
    with run_scope("badin") as run, pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry_module, "SEQ_WINDOW", SEQ_WINDOW)
        config = CoordinatorConfig(
        auth=AuthMode.OPEN,
            run=run,
            task_settings=TASK,
            # mallory sends every kind within seconds: its rate limit would refuse the later ones
            # rate_limited (tests/unit/test_admission.py checks that) instead of their own reason
            intake=IntakeConfig(max_staleness=MAX_STALENESS, limits=limits, max_deltas_per_minute=6000),
            commit=CommitConfig(every_updates=4, interval_s=0.3),
            connection=ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL),
            checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
            max_seconds=300, guard=MADE_UP_DELTAS_GUARD,
        )
        client = redis.Redis.from_url(REDIS_URL)
        with serving(config) as coord:
            s = Served(coord, run, RunKeys(run), client, limits, numels)
            # "veteran" gets seqs 10..14 applied (one commit each): versions move past the
            # staleness bound and its remembered window becomes [11, 14].
            # Each on the newest *published* version: one delta per client per base (already_sent).
            store = SnapshotStore(client, s.keys)
            for seq in range(10, 15):
                version = coord.version
                s.publish(s.honest(client_id="veteran", seq=seq))
                wait_for(lambda v=version: (store.current_version() or 0) > v,
                         what=f"veteran seq {seq} committed and published")
            assert coord.version >= MAX_STALENESS + 2
            wait_for(lambda: s.status().get("deltas", {}).get("applied") == 5, what="status")
            yield s
        client.close()


# ------------------------------------------------------------------------- the hostile kinds
def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)


def _declares_4gib(s: Served) -> bytes:
    # every field of a real delta, then "tensors": {"name": bin32 of 2**32 - 1 bytes}, 16 sent
    obj = s.fields(tensors=...)
    head = _map_header(len(obj) + 1) + b"".join(pack(k) + pack(v) for k, v in obj.items())
    name = next(iter(s.numels))
    return head + pack("tensors") + b"\x81" + pack(name) + b"\xc6\xff\xff\xff\xff" + b"\x00" * 16


def _oversized(s: Served) -> bytes:
    obj = s.fields(encoding="fp32")
    obj["tensors"]["padding"] = b"\x00" * (s.limits.max_message_bytes - len(pack(obj)) + 1)
    body = pack(obj)
    assert len(body) > s.limits.max_message_bytes
    return body


def _resize_one(s: Served, codec: str, by: int) -> bytes:
    obj = s.fields(encoding=codec)
    name = next(iter(obj["tensors"]))
    blob = obj["tensors"][name]
    obj["tensors"][name] = blob[:by] if by < 0 else blob + b"\x00" * by
    return pack(obj)


def _with_value(s: Served, codec: str, value: float) -> bytes:
    # an honest delta with one element set to ``value`` (NaN, Inf), encoded by ``codec``
    obj = s.fields(encoding=codec)
    name = next(iter(obj["tensors"]))
    raw = bytearray(obj["tensors"][name])
    fmt = "<f" if codec == "fp32" else "<e"
    struct.pack_into(fmt, raw, 0, value)
    obj["tensors"][name] = bytes(raw)
    return pack(obj)


def _int8_nan_scale(s: Served) -> bytes:
    obj = s.fields(encoding="int8")
    name = next(iter(obj["tensors"]))
    obj["tensors"][name] = struct.pack("<f", math.nan) + obj["tensors"][name][4:]  # block 0's scale
    return pack(obj)


def _stale(s: Served) -> bytes:
    return pack(s.fields(base_version=s.coord.version - MAX_STALENESS - 1))


KINDS: list[Any] = [
    # -- bytes that are not a delta at all
    pytest.param(lambda s: b"", "empty", id="empty-body"),
    pytest.param(lambda s: s.honest(client_id=HOSTILE, seq=1)[:-100], "truncated", id="truncated"),
    pytest.param(lambda s: s.honest(client_id=HOSTILE, seq=1)[:7], "truncated", id="truncated-header"),
    pytest.param(lambda s: random.Random(0).randbytes(4096), "undecodable", id="random-bytes"),
    pytest.param(lambda s: b"\xc1" * 64, "undecodable", id="never-used-byte"),
    pytest.param(lambda s: s.honest(client_id=HOSTILE, seq=1) + b"\x00", "undecodable",
                 id="trailing-bytes"),
    # -- valid msgpack, wrong schema
    pytest.param(lambda s: pack([1, 2, 3]), "wrong_schema", id="list-at-top"),
    pytest.param(lambda s: pack({}), "wrong_schema", id="map-without-fields"),
    pytest.param(lambda s: pack(s.fields(seq="3")), "wrong_schema", id="str-for-int"),
    pytest.param(lambda s: pack(s.fields(tensors=[b"\x00"])), "wrong_schema", id="list-for-tensors"),
    pytest.param(lambda s: pack(s.fields(local_steps=True)), "wrong_schema", id="bool-for-int"),
    pytest.param(lambda s: pack(s.fields(seq=-1)), "wrong_schema", id="negative-int"),
    pytest.param(lambda s: pack(s.fields(seq=2**63)), "wrong_schema", id="int-2**63"),
    pytest.param(lambda s: pack(s.fields(base_version=2**64 - 1)), "wrong_schema", id="uint64-max"),
    pytest.param(lambda s: pack(s.fields(protocol=PROTOCOL_VERSION + 1)), "protocol_version",
                 id="wrong-protocol-version"),
    pytest.param(lambda s: pack(s.fields(type="plan")), "wrong_schema", id="wrong-message-type"),
    pytest.param(lambda s: pack(s.fields(compute_s=-1.0)), "wrong_schema", id="compute_s-negative"),
    pytest.param(lambda s: pack(s.fields(compute_s=math.nan)), "wrong_schema", id="compute_s-nan"),
    # -- hostile structure: nesting, declared lengths, ext types, sizes
    pytest.param(lambda s: b"\x91" * 5000 + b"\xc0", "too_deep", id="deep-nesting-arrays"),
    pytest.param(lambda s: b"\x81\xa7tensors" + b"\x81\xa1k" * 5000 + b"\xc0", "too_deep",
                 id="deep-nesting-maps"),
    pytest.param(lambda s: b"\xdd\xff\xff\xff\xff", "too_large", id="huge-array-header"),
    pytest.param(lambda s: b"\xdf\xff\xff\xff\xff" + b"\xa1k\xc0", "too_large", id="huge-map-header"),
    pytest.param(lambda s: b"\xdb\xff\xff\xff\xff" + b"abc", "truncated", id="huge-str-header"),
    pytest.param(_declares_4gib, "truncated", id="declares-4GiB-bin"),
    pytest.param(lambda s: pack(s.fields(client_id=msgpack.ExtType(5, b"x"))), "ext_type",
                 id="ext-type"),
    pytest.param(lambda s: pack(s.fields(sent_at=msgpack.Timestamp(1_700_000_000))), "ext_type",
                 id="timestamp-ext-minus-1"),
    pytest.param(_oversized, "too_large", id="oversized-body"),
    pytest.param(lambda s: pack(s.fields(tensors={f"p{i}": b"" for i in range(4097)})), "too_large",
                 id="too-many-tensors"),
    pytest.param(lambda s: pack(s.fields(tensors={"n" * 300: b""})), "too_large",
                 id="oversized-tensor-name"),
    # -- well-formed, but not for this run / this model
    pytest.param(lambda s: pack(s.fields(run_id="someone-else-0123")), "wrong_run", id="wrong-run-id"),
    pytest.param(lambda s: pack(s.fields(client_id="../../etc/passwd")), "bad_client_id",
                 id="bad-client-id"),
    pytest.param(lambda s: pack(s.fields(client_id="veteran", seq=3)), "replayed",
                 id="seq-older-than-window"),
    pytest.param(_stale, "stale", id="stale-base-version"),
    pytest.param(lambda s: pack(s.fields(base_version=s.coord.version + 5)), "future_version",
                 id="future-version"),
    pytest.param(lambda s: pack(s.fields(local_steps=0)), "bad_steps", id="local_steps-0"),
    pytest.param(lambda s: pack(s.fields(local_steps=10**12)), "bad_steps", id="local_steps-absurd"),
    pytest.param(lambda s: pack(s.fields(local_steps=10**6)), "over_assignment", id="local_steps-over-h"),
    pytest.param(lambda s: pack(s.fields(client_id="veteran", seq=20,
                                         base_version=s.coord.run.registry.clients["veteran"].last_base)),
                 "already_sent", id="second-delta-on-a-base"),
    pytest.param(lambda s: pack(s.fields(codec="zstd")), "unknown_codec", id="unknown-codec"),
    pytest.param(lambda s: pack(s.fields(tensors=dict(list(s.fields()["tensors"].items())[1:]))),
                 "wrong_names", id="missing-tensor"),
    pytest.param(lambda s: pack(s.fields(tensors={**s.fields()["tensors"], "evil.weight": b"\x00" * 4})),
                 "wrong_names", id="extra-tensor"),
    pytest.param(lambda s: _resize_one(s, "fp32", -1), "wrong_size", id="wrong-size-fp32"),
    pytest.param(lambda s: _resize_one(s, "fp16", 2), "wrong_size", id="wrong-size-fp16"),
    pytest.param(lambda s: _resize_one(s, "int8", -4), "wrong_size", id="wrong-size-int8"),
    # -- right shape, poisonous values
    pytest.param(lambda s: _with_value(s, "fp32", math.nan), "non_finite", id="nan"),
    pytest.param(lambda s: _with_value(s, "fp16", math.inf), "non_finite", id="plus-inf"),
    pytest.param(_int8_nan_scale, "non_finite", id="int8-nan-scale"),
    pytest.param(lambda s: pack(s.fields(encoding="fp32", scale=1e3)), "norm_too_large", id="absurd-norm"),
]


@pytest.mark.parametrize(("build", "reason"), KINDS)
def test_hostile_delta_is_refused_with_its_reason(
    served: Served, build: Callable[[Served], bytes], reason: str
) -> None:
    body = build(served)
    before = served.status()["deltas"]
    bits = params_bits(served.coord)
    served.publish(body)
    after = wait_for(
        lambda: (d := served.status()["deltas"])["rejected"] > before["rejected"] and d,
        what=f"a rejection counted as {reason}",
    )
    grown = Counter(after["rejected_by_reason"]) - Counter(before["rejected_by_reason"])
    assert grown == Counter({reason: 1}), f"expected one {reason!r}, status counted {dict(grown)}"
    assert after["rejected"] == before["rejected"] + 1
    assert (after["applied"], after["duplicate"]) == (before["applied"], before["duplicate"])
    assert_same_bits(params_bits(served.coord), bits)
    [(headers, letter)] = served.take_dead_letters(1)
    assert headers["x-asyncloco-reason"] == reason
    assert headers["x-asyncloco-detail"]
    assert letter == body
    served.refused += 1


def test_replayed_applied_seq_is_a_duplicate_not_applied_twice(served: Served) -> None:
    body = served.honest(client_id="honest", seq=0)
    before = served.status()["deltas"]
    served.publish(body)
    wait_for(lambda: served.status()["deltas"]["applied"] == before["applied"] + 1, what="applied")
    wait_for(lambda: not served.coord.batch, what="commit")
    bits = params_bits(served.coord)
    version = served.coord.version
    served.publish(body)  # the same delta again: a retry or a replay
    after = wait_for(
        lambda: (d := served.status()["deltas"])["duplicate"] == before["duplicate"] + 1 and d,
        what="duplicate counted",
    )
    assert after["applied"] == before["applied"] + 1
    assert after["rejected"] == before["rejected"]
    assert_same_bits(params_bits(served.coord), bits)
    assert served.coord.version == version
    # a duplicate is acknowledged, not dead-lettered: the next rejected delta's letter is the only one
    served.publish(b"")
    [(headers, _)] = served.take_dead_letters(1)
    assert headers["x-asyncloco-reason"] == "empty"


def test_every_kind_is_distinct_and_covers_the_brief() -> None:
    ids = [p.id for p in KINDS]
    assert len(ids) == len(set(ids)) >= 30


def test_honest_fp32_delta_is_still_applied_at_the_end(served: Served) -> None:
    status = served.status()
    assert status["coordinator"]["state"] == "serving"
    assert status["deltas"]["rejected"] >= served.refused
    bits = params_bits(served.coord)
    version = served.coord.version
    body = served.honest(client_id="honest", seq=1, encoding="fp32")
    assert len(body) <= served.limits.max_message_bytes  # the lowered limit still fits fp32
    served.publish(body)
    wait_for(lambda: served.coord.version > version, what="honest delta committed")
    assert any(not torch.equal(a, b) for a, b in zip(params_bits(served.coord).values(), bits.values(),
                                                      strict=True))
    snap = wait_for(lambda: (sn := SnapshotStore(served.redis, served.keys).read_latest()).version
                    == served.coord.version and sn, what="snapshot of the new version")
    for name, tensor in snap.params.items():
        assert torch.equal(tensor, served.coord.run.optimizer.params[name].detach())
    wait_for(lambda: served.status()["deltas"]["applied"] == status["deltas"]["applied"] + 1,
             what="status shows the honest delta")
