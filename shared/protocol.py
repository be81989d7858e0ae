"""Wire messages: frozen dataclasses, each with one encode/decode pair and explicit limits.

Everything that crosses the network is msgpack (never pickle). Decoding is strict: size limits are
enforced by the msgpack unpacker itself before any object is built, ext types are refused, and every
field is type-checked. A failure raises :class:`~shared.errors.ProtocolError` with a short reason
slug that the coordinator counts. The unpacker's own failures are told apart, because they point at
different culprits: ``truncated`` (the body ends inside a value: a cut message, or a length header
claiming more bytes than were sent), ``too_large`` (a declared array/map/str/bin length or the body
itself over a limit), ``too_deep`` (nesting beyond the unpacker's stack), ``ext_type`` (msgpack
extension types, timestamps included) and ``undecodable`` (anything else that is not msgpack).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from shared import PROTOCOL_VERSION
from shared.codecs import CODECS
from shared.errors import ProtocolError, ProtocolVersionError

MiB = 1024 * 1024


@dataclass(frozen=True)
class DeltaLimits:
    """Upper bounds a decoder enforces on a delta message.

    ``max_message_bytes`` bounds one AMQP message: RabbitMQ 4.x refuses messages over 16 MiB by
    default. A delta bigger than that travels as :class:`DeltaPart` messages and is reassembled
    by the coordinator, up to ``max_delta_bytes`` in all and ``max_parts`` parts.
    """

    max_message_bytes: int = 16 * MiB
    max_delta_bytes: int = 1024 * MiB
    max_parts: int = 1024
    max_tensors: int = 4096
    max_name_chars: int = 256
    max_id_chars: int = 128

    def assembled(self) -> DeltaLimits:
        """The limits for a delta reassembled from parts: the body may be ``max_delta_bytes``."""
        return replace(self, max_message_bytes=self.max_delta_bytes)


DEFAULT_DELTA_LIMITS = DeltaLimits()

# What an encoded delta holds besides its tensors' payloads: its msgpack fields (ids of at most
# 128 chars, a device label of at most 64, counts, floats, four timings), with room to spare; and,
# per tensor, the headers of its name and bytes.
DELTA_ENVELOPE_BYTES = 4096
TENSOR_ENVELOPE_BYTES = 16
# A delta's ``device`` label ("cpu (8 threads)", "cuda: NVIDIA H200"): at most this many printable
# characters. The decoder refuses more; a client cuts its own label to fit (:func:`device_label`).
DEVICE_MAX_CHARS = 64
# What a delta may say of its sender's previous round (``DeltaMessage.previous_timings``): seconds
# spent on each of these, each finite and within 0..TIMING_MAX_S. The decoder refuses anything
# else; a client makes its own fit (:func:`round_timings`).
ROUND_TIMINGS = ("fetch_s", "encode_s", "upload_s", "wait_s")
TIMING_MAX_S = 7 * 24 * 3600.0


def delta_bytes_bound(numels: Mapping[str, int]) -> int:
    """The most bytes an encoded delta of a model with these tensors (name -> element count) can
    take: the largest codec's payloads, the tensor names, and the envelope around them."""
    payloads = max(sum(codec.encoded_bytes(n) for n in numels.values()) for codec in CODECS.values())
    names = sum(len(name.encode()) + TENSOR_ENVELOPE_BYTES for name in numels)
    return payloads + names + DELTA_ENVELOPE_BYTES


def device_label(text: str) -> str:
    """``text`` made fit for a delta's ``device`` field: its printable characters only (no control
    or format characters: no terminal escapes, no bidi overrides), trimmed, at most
    :data:`DEVICE_MAX_CHARS` of them: whatever it returns, :meth:`DeltaMessage.decode` accepts."""
    return "".join(ch for ch in text if ch.isprintable()).strip()[:DEVICE_MAX_CHARS].strip()


def round_timings(*, fetch_s: float, encode_s: float, upload_s: float, wait_s: float) -> dict[str, float]:
    """A delta's ``previous_timings``: the seconds of one round, each made fit for the protocol
    (not finite: 0; below 0 or above :data:`TIMING_MAX_S`: cut to it): whatever it returns,
    :meth:`DeltaMessage.decode` accepts."""
    seconds = {"fetch_s": fetch_s, "encode_s": encode_s, "upload_s": upload_s, "wait_s": wait_s}
    return {name: min(TIMING_MAX_S, max(0.0, float(value))) if math.isfinite(value) else 0.0
            for name, value in seconds.items()}


def _decode_timings(obj: dict[str, Any]) -> dict[str, float]:
    """The optional ``previous_timings`` map: absent (a client that predates it, or a first round)
    is ``{}``; present, it names exactly :data:`ROUND_TIMINGS`, each a number within
    0..:data:`TIMING_MAX_S`, or the delta is refused."""
    if "previous_timings" not in obj:
        return {}
    raw = require_field(obj, "previous_timings", dict)
    if set(raw) != set(ROUND_TIMINGS):
        raise ProtocolError("wrong_schema",
                            f"field 'previous_timings' must name exactly {', '.join(ROUND_TIMINGS)}")
    timings = {}
    for name in ROUND_TIMINGS:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError("wrong_schema", f"previous_timings[{name!r}] has type {type(value).__name__}")
        if not (math.isfinite(value) and 0 <= value <= TIMING_MAX_S):
            raise ProtocolError("wrong_schema",
                                f"previous_timings[{name!r}] must be within 0..{TIMING_MAX_S:.0f} s")
        timings[name] = float(value)
    return timings


class _ExtTypeRefused(ValueError):
    pass


def _refuse_ext(code: int, data: bytes) -> Any:
    # max_ext_len=0 still lets a zero-length ext (``c7 00 <code>``) through; refuse it here.
    raise _ExtTypeRefused(f"ext type {code} refused")


def _unpack_failure(exc: BaseException) -> ProtocolError:
    """Map an unpacker exception to the reason slug it deserves.

    msgpack (C and pure-Python alike) reports limits as ``"N exceeds max_xxx_len(M)"`` and a body
    that ends inside a value as ``"... incomplete input"``; both are checked *before* anything of
    the declared size is allocated.
    """
    text = str(exc)
    if isinstance(exc, msgpack.ExtraData):
        return ProtocolError("undecodable", "trailing bytes after the message")
    if isinstance(exc, (msgpack.StackError, RecursionError)):
        return ProtocolError("too_deep", "containers nested deeper than the unpacker allows")
    if isinstance(exc, _ExtTypeRefused) or "exceeds max_ext_len" in text:
        return ProtocolError("ext_type", f"msgpack ext types are refused ({text})")
    if "exceeds max_" in text:
        return ProtocolError("too_large", f"a declared length is over the limit ({text})")
    if "incomplete input" in text:
        return ProtocolError("truncated", "the message ends inside a value")
    return ProtocolError("undecodable", f"not valid msgpack ({text or type(exc).__name__})")


def unpack_limited(data: bytes, *, max_bytes: int, max_items: int, max_str: int) -> Any:
    """Unpack one msgpack value with every length bounded; raise :class:`ProtocolError` otherwise.

    ``max_bytes`` bounds the body and every bin; ``max_items`` every array and map; ``max_str``
    every string. No ext types are accepted.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("undecodable", "message body is not bytes")
    if len(data) == 0:
        raise ProtocolError("empty", "message body is empty")
    if len(data) > max_bytes:
        raise ProtocolError("too_large", f"message is {len(data)} bytes, limit {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_str,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,  # no ext types at all (timestamps included)
            ext_hook=_refuse_ext,
            use_list=True,
        )
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise _unpack_failure(exc) from exc


def require_field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise ProtocolError("wrong_schema", f"missing field {name!r}")
    value = obj[name]
    # bool is an int subclass; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError("wrong_schema", f"field {name!r} has type bool")
    if not isinstance(value, kind):
        raise ProtocolError("wrong_schema", f"field {name!r} has type {type(value).__name__}")
    return value


def check_protocol(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError("wrong_schema", f"top level is {type(obj).__name__}, expected a map")
    version = require_field(obj, "protocol", int)
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(version, PROTOCOL_VERSION)  # reason "protocol_version"
    return obj


@dataclass(frozen=True)
class DeltaMessage:
    """One pseudo-gradient ``g = θ_base − θ_local`` from one client round.

    ``tensors`` maps parameter name to the codec's encoded bytes; shapes and dtypes are *not* sent:
    the coordinator takes them from its own manifest. ``(client_id, seq)`` identifies the delta
    for de-duplication: a retried publish reuses its ``seq``. ``device`` is what the client says it
    trains on ("cpu (8 threads)", "cuda: NVIDIA H200", "mps"; at most :data:`DEVICE_MAX_CHARS`
    printable characters): its claim, shown to the operator, never used; optional on the wire (a
    client that predates it sends none: ``""``). ``previous_timings`` is likewise a claim, shown
    only: the seconds the client's previous round spent on each of :data:`ROUND_TIMINGS` (reading
    snapshots, encoding, uploading, waiting on the coordinator); optional (``{}``: none said, as by
    a client that predates it or in a client's first round). ``stacked_on``: the seq of this
    client's previous delta when this one's round started from ``base_version`` moved by that
    delta as the coordinator moves θ at its arrival (``--overlap``: the round began before that
    delta was in a snapshot); -1 (left out on the wire) otherwise. ``origin_version``: the version
    the round began training from when it moved onto ``base_version`` while it trained
    (``--follow``, ``--overlap``); -1 (left out) when it began from ``base_version``. A claim,
    used only to date the round's start for its speed (coordinator/registry.py), and only when
    earlier than ``base_version``: it can make a round look longer, never shorter.
    """

    run_id: str
    client_id: str
    seq: int
    base_version: int
    local_steps: int
    samples: int
    tokens: int
    compute_s: float
    train_loss: float
    codec: str
    tensors: dict[str, bytes] = field(repr=False)
    sent_at: float = 0.0
    device: str = ""
    previous_timings: dict[str, float] = field(default_factory=dict)
    stacked_on: int = -1
    origin_version: int = -1

    @property
    def delta_id(self) -> str:
        return f"{self.client_id}:{self.seq}"

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "protocol": PROTOCOL_VERSION,
                "type": "delta",
                "run_id": self.run_id,
                "client_id": self.client_id,
                "seq": self.seq,
                "base_version": self.base_version,
                "local_steps": self.local_steps,
                "samples": self.samples,
                "tokens": self.tokens,
                "compute_s": float(self.compute_s),
                "train_loss": float(self.train_loss),
                "codec": self.codec,
                "tensors": self.tensors,
                "sent_at": float(self.sent_at),
                "device": self.device,
                # left out when empty: an empty map would be refused, and an older peer ignores it
                **({"previous_timings": {name: float(value) for name, value in self.previous_timings.items()}}
                   if self.previous_timings else {}),
                **({"stacked_on": self.stacked_on} if self.stacked_on >= 0 else {}),
                **({"origin_version": self.origin_version} if self.origin_version >= 0 else {}),
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes, limits: DeltaLimits = DEFAULT_DELTA_LIMITS) -> DeltaMessage:
        """Parse and type-check a delta; raise :class:`ProtocolError` on anything off."""
        obj = check_protocol(
            unpack_limited(
                data,
                max_bytes=limits.max_message_bytes,
                max_items=limits.max_tensors + 32,
                max_str=max(limits.max_name_chars, limits.max_id_chars),
            )
        )
        if obj.get("type") != "delta":
            raise ProtocolError("wrong_schema", f"message type {obj.get('type')!r} is not 'delta'")
        ints = {n: require_field(obj, n, int) for n in ("seq", "base_version", "local_steps", "samples",
                                                  "tokens")}
        for name, value in ints.items():
            if value < 0 or value >= 2**63:
                raise ProtocolError("wrong_schema", f"field {name!r} out of range: {value}")
        floats = {n: float(require_field(obj, n, (int, float))) for n in ("compute_s", "train_loss",
                                                                   "sent_at")}
        if not math.isfinite(floats["compute_s"]) or floats["compute_s"] < 0:
            raise ProtocolError("wrong_schema", "compute_s must be finite and >= 0")
        strs = {n: require_field(obj, n, str) for n in ("run_id", "client_id", "codec")}
        for name, value in strs.items():
            if not value:
                raise ProtocolError("wrong_schema", f"field {name!r} is empty")
            if len(value) > limits.max_id_chars:
                raise ProtocolError("too_large", f"field {name!r} over {limits.max_id_chars} chars")
        # Optional (a client that predates it sends none); refused rather than cleaned when off,
        # like every other field: an honest client cuts its label with device_label().
        device = require_field(obj, "device", str) if "device" in obj else ""
        if len(device) > DEVICE_MAX_CHARS:
            raise ProtocolError("too_large", f"field 'device' over {DEVICE_MAX_CHARS} chars")
        if not device.isprintable():
            raise ProtocolError("wrong_schema", "field 'device' holds a character that is not printable")
        timings = _decode_timings(obj)  # optional too, and as strictly checked
        optional = {n: require_field(obj, n, int) if n in obj else -1
                    for n in ("stacked_on", "origin_version")}
        for name, value in optional.items():
            if not 0 <= value < 2**63 and value != -1:
                raise ProtocolError("wrong_schema", f"field {name!r} out of range: {value}")
        tensors = require_field(obj, "tensors", dict)
        if not tensors:
            raise ProtocolError("wrong_schema", "no tensors in delta")
        if len(tensors) > limits.max_tensors:
            raise ProtocolError("too_large", f"{len(tensors)} tensors, limit {limits.max_tensors}")
        for name, blob in tensors.items():
            if not isinstance(name, str):
                raise ProtocolError("wrong_schema", "tensor name is not a string")
            if len(name) > limits.max_name_chars:
                raise ProtocolError("too_large", f"tensor name over {limits.max_name_chars} chars")
            if not isinstance(blob, bytes):
                raise ProtocolError("wrong_schema", f"tensor {name!r} payload is not bytes")
        fields: dict[str, Any] = {**strs, **ints, **floats}  # each checked above
        return cls(tensors=tensors, device=device, previous_timings=timings,
                   stacked_on=optional["stacked_on"], origin_version=optional["origin_version"], **fields)
