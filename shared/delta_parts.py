"""Deltas too big for one broker message travel in parts: :class:`DeltaPart` on the wire (a slice of the
encoded :class:`~shared.protocol.DeltaMessage`, with the whole's length and SHA-256), cut by
:class:`DeltaSplit` without copying. Decoded as strictly as every wire message
(:mod:`shared.protocol`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgpack

from shared import PROTOCOL_VERSION
from shared.errors import ProtocolError
from shared.protocol import DEFAULT_DELTA_LIMITS, DeltaLimits, check_protocol, require_field, unpack_limited

PART_TYPE = "delta_part"  # the message type (msgpack "type" and the AMQP type property) of a part
PART_HEADER_BYTES = 1024  # what a part's msgpack fields add to its data, with room to spare


@dataclass(frozen=True)
class DeltaPart:
    """One slice of an encoded :class:`DeltaMessage` too big for one broker message.

    The parts of delta ``(client_id, seq)`` are ``count`` contiguous byte ranges of its encoding,
    ``total_bytes`` long in all, whose SHA-256 is ``sha256``; every part repeats these fields, so
    any part may arrive first and a part of another delta cannot be mixed in unnoticed.
    """

    run_id: str
    client_id: str
    seq: int
    index: int
    count: int
    offset: int
    total_bytes: int
    sha256: bytes
    data: bytes = field(repr=False)

    def encode(self) -> bytes:
        return self.encode_with(self.data)

    def encode_with(self, data: bytes | memoryview) -> bytes:
        """This part's encoding with ``data`` in place of its own: how a sender packs a slice of its
        delta's bytes (a memoryview) without copying them first (:meth:`DeltaSplit.encoded`)."""
        return msgpack.packb(
            {
                "protocol": PROTOCOL_VERSION,
                "type": PART_TYPE,
                "run_id": self.run_id,
                "client_id": self.client_id,
                "seq": self.seq,
                "index": self.index,
                "count": self.count,
                "offset": self.offset,
                "total_bytes": self.total_bytes,
                "sha256": self.sha256,
                "data": data,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes, limits: DeltaLimits = DEFAULT_DELTA_LIMITS) -> DeltaPart:
        """Parse and check one part on its own; whether it fits its siblings is the spool's job."""
        obj = check_protocol(
            unpack_limited(data, max_bytes=limits.max_message_bytes, max_items=32,
                           max_str=limits.max_id_chars)
        )
        if obj.get("type") != PART_TYPE:
            raise ProtocolError("wrong_schema", f"message type {obj.get('type')!r} is not {PART_TYPE!r}")
        strs = {n: require_field(obj, n, str) for n in ("run_id", "client_id")}
        if not all(strs.values()):
            raise ProtocolError("wrong_schema", "run_id and client_id must not be empty")
        ints = {n: require_field(obj, n, int) for n in ("seq", "index", "count", "offset", "total_bytes")}
        if not 0 <= ints["seq"] < 2**63:
            raise ProtocolError("wrong_schema", f"field 'seq' out of range: {ints['seq']}")
        if not 1 <= ints["count"] <= limits.max_parts:
            raise ProtocolError("too_large", f"{ints['count']} parts, limit {limits.max_parts}")
        if not 0 <= ints["index"] < ints["count"]:
            raise ProtocolError("bad_part", f"part index {ints['index']} outside 0..{ints['count'] - 1}")
        if not 0 < ints["total_bytes"] <= limits.max_delta_bytes:
            raise ProtocolError("too_large",
                                f"delta of {ints['total_bytes']} bytes, limit {limits.max_delta_bytes}")
        sha = require_field(obj, "sha256", bytes)
        if len(sha) != 32:
            raise ProtocolError("wrong_schema", "sha256 must be 32 bytes")
        body = require_field(obj, "data", bytes)
        if not body or ints["offset"] < 0 or ints["offset"] + len(body) > ints["total_bytes"]:
            raise ProtocolError("bad_part", f"part {ints['index']} does not lie inside the delta's bytes")
        return cls(sha256=sha, data=body, **strs, **ints)


@dataclass(frozen=True)
class DeltaSplit:
    """How an encoded delta ``body`` is cut into parts of at most ``part_bytes`` data bytes each,
    each made only when asked for: :meth:`part` (a copy of its bytes), or :meth:`encoded` (packed
    straight from the delta's bytes), so that a sender holds no more than the parts it has in
    flight."""

    body: bytes = field(repr=False)
    part_bytes: int
    run_id: str
    client_id: str
    seq: int
    sha256: bytes

    @classmethod
    def of(cls, body: bytes, *, part_bytes: int, run_id: str, client_id: str, seq: int) -> DeltaSplit:
        if part_bytes < 1:
            raise ValueError("part_bytes must be >= 1")
        return cls(body=body, part_bytes=part_bytes, run_id=run_id, client_id=client_id, seq=seq,
                   sha256=hashlib.sha256(body).digest())

    @property
    def count(self) -> int:
        return -(-len(self.body) // self.part_bytes)

    def part(self, index: int) -> DeltaPart:
        return self._part(index, self.body[index * self.part_bytes:(index + 1) * self.part_bytes])

    def encoded(self, index: int) -> bytes:
        """``part(index).encode()``, byte for byte, without the copy of the part's data."""
        offset = index * self.part_bytes
        return self._part(index, b"").encode_with(memoryview(self.body)[offset:offset + self.part_bytes])

    def _part(self, index: int, data: bytes) -> DeltaPart:
        return DeltaPart(run_id=self.run_id, client_id=self.client_id, seq=self.seq, index=index,
                         count=self.count, offset=index * self.part_bytes, total_bytes=len(self.body),
                         sha256=self.sha256, data=data)


def split_delta(body: bytes, *, part_bytes: int, run_id: str, client_id: str, seq: int) -> list[DeltaPart]:
    """Cut an encoded delta into parts of at most ``part_bytes`` data bytes each."""
    split = DeltaSplit.of(body, part_bytes=part_bytes, run_id=run_id, client_id=client_id, seq=seq)
    return [split.part(i) for i in range(split.count)]
