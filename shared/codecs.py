"""Delta codecs: how a pseudo-gradient tensor becomes bytes and back.

All codecs decode to float32 on the coordinator, and every decoder checks the exact byte length
against the element count that the *receiver* expects (taken from its own manifest), so a sender
cannot make the receiver allocate more than the model's size.

=========  ====================  =======================================================
codec      bytes / element       worst-case error per element
=========  ====================  =======================================================
fp32       4                     0 (exact)
fp16       2                     ~2^-11 relative (values beyond ±65504 are refused)
int8       1 + 4/256             absmax(block) / 254 (half a quantisation step)
int4       0.5 + 2/64            scale(block) / 15, scale = absmax rounded up to bfloat16
int3       0.375 + 2/64          scale(block) / 7 (the clients' default)
topk       (2 + 15 · 1.5) / 256  kept (15 of 256 per block): scale / 15; the rest: all of it
=========  ====================  =======================================================

Lossy codecs are used with :class:`~shared.error_feedback.ErrorFeedback` on the client, so what is
lost in one round is sent in the next instead of being dropped: for ``topk`` that is most of each
round's delta.

Decoders treat the bytes as hostile: besides the exact length, a non-finite scale is refused
(``non_finite``), so is a top-k index that is out of its block, repeated or out of order
(``bad_index``); every other byte pattern decodes to values no larger than their block's scale,
so nothing a sender writes can make a decoder loop, allocate beyond the tensor or overflow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from shared.errors import ProtocolError

INT8_BLOCK = 256  # elements per absmax block; smaller blocks: less error, more scale bytes


def _as_flat_f32(tensor: torch.Tensor) -> np.ndarray:
    # (numel,) float32, little-endian, on the CPU
    return tensor.detach().to("cpu", torch.float32).reshape(-1).numpy().astype("<f4", copy=False)


def _over(blob: bytes, dtype: str, *, offset: int = 0, count: int = -1) -> torch.Tensor:
    """A tensor over ``blob``'s bytes read as little-endian ``dtype`` (numpy's name), without a
    copy: only ever read (a decoder's result is always its own memory), so torch's warning about
    a read-only buffer does not apply."""
    array = np.frombuffer(blob, dtype=dtype, offset=offset, count=count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """``values`` (numel,) float32, its own memory, times each ``block``'s scale, in place."""
    full = values.numel() // block
    values[: full * block].view(full, block).mul_(scales[:full, None])
    if full * block < values.numel():
        values[full * block :].mul_(scales[full])
    return values


def _expect_len(blob: bytes, expected: int, codec: str) -> None:
    if len(blob) != expected:
        raise ProtocolError(
            "wrong_size", f"{codec} payload is {len(blob)} bytes, expected {expected}"
        )


@dataclass(frozen=True)
class Fp32Codec:
    name: str = "fp32"

    def encoded_bytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, tensor: torch.Tensor) -> bytes:
        return _as_flat_f32(tensor).tobytes()

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        return torch.from_numpy(np.frombuffer(blob, dtype="<f4").astype(np.float32))


@dataclass(frozen=True)
class Fp16Codec:
    name: str = "fp16"

    def encoded_bytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = _flat_f32(tensor)  # converted where it is: only the fp16 bytes leave a device
        if flat.numel() and float(flat.abs().max()) > 65504.0:
            raise ValueError("delta has values beyond the fp16 range; use --codec fp32")
        return _to_bytes(flat.to(torch.float16), "<f2")

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        return _over(blob, "<f2").to(torch.float32)  # torch converts half to float faster than numpy


@dataclass(frozen=True)
class Int8BlockCodec:
    """Blockwise absmax int8: per block of ``block`` elements one fp32 scale, then int8 values.

    Layout: ``scales (nblocks,) <f4`` followed by ``values (numel,) int8``.
    """

    name: str = "int8"
    block: int = INT8_BLOCK

    def _nblocks(self, numel: int) -> int:
        return (numel + self.block - 1) // self.block

    def encoded_bytes(self, numel: int) -> int:
        return 4 * self._nblocks(numel) + numel

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = _flat_f32(tensor)  # quantised where it is: only the int8 bytes leave a device
        numel = flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, (-numel) % self.block)).view(-1, self.block)
        scales = blocks.abs().amax(dim=1) / 127.0  # (nblocks,)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        # round half to even, as numpy's rint (the layout this codec always had)
        q = torch.round(blocks / safe).clamp_(-127, 127).to(torch.int8).reshape(-1)[:numel]
        return _to_bytes(scales, "<f4") + _to_bytes(q, "i1")

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        nblocks = self._nblocks(numel)
        scales = _over(blob, "<f4", count=nblocks)
        values = _over(blob, "i1", offset=4 * nblocks, count=numel).to(torch.float32)  # one new array
        return _scale_blocks(values, scales, self.block)


INT4_BLOCK = 64  # elements per bfloat16 scale: 0.5 + 2/64 bytes per element
# The 16 4-bit codes are 16 evenly spaced levels over [-1, 1] (code c: (2c - 15) / 15). There is no
# exact zero, so every code carries a value; error feedback carries the ±1/15 a small value gets.
_INT4_LEVELS = (torch.arange(16, dtype=torch.float32) * 2 - 15) / 15
_BYTE = torch.arange(256)
_INT4_PAIRS = _INT4_LEVELS[torch.stack((_BYTE & 15, _BYTE >> 4), dim=1)]  # (256, 2): a byte's two levels
_BF16_MAX = torch.tensor(3.3895313892515355e38, dtype=torch.float32)  # bits 0x7F7F0000

TOPK_BLOCK = 256  # offsets within a block are one byte
TOPK_KEPT = 15  # entries kept per full block: (2 + 15 + 7.5) / 256 = 0.096 bytes per element


def _flat_f32(tensor: torch.Tensor) -> torch.Tensor:
    # (numel,) float32 on the tensor's own device: quantisation runs where the delta is
    return tensor.detach().to(torch.float32).reshape(-1)


def _to_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    return tensor.to("cpu").numpy().astype(dtype, copy=False).tobytes()


def _bf16_ceil(absmax: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 ≥ ``absmax`` (float32, ≥ 0), as float32; capped at bfloat16's largest
    finite value; NaN and Inf stay non-finite (the decoder refuses them)."""
    bits = absmax.view(torch.int32).to(torch.int64)
    up = ((bits + 0xFFFF) & ~0xFFFF).to(torch.int32).view(torch.float32)
    up = torch.minimum(up, _BF16_MAX.to(up.device))
    return torch.where(torch.isfinite(absmax), up, absmax)


def _bf16_bytes(scales: torch.Tensor) -> bytes:
    # scales are bfloat16 values held in float32: their upper 16 bits, little-endian
    return _to_bytes((scales.view(torch.int32) >> 16) & 0xFFFF, "<u2")


def _read_bf16(blob: bytes, count: int, codec: str) -> torch.Tensor:
    """``count`` bfloat16 scales from the start of ``blob`` as float32; refuse a NaN or an Inf."""
    bits = np.frombuffer(blob, dtype="<u2", count=count).astype(np.int32) << 16
    scales = torch.from_numpy(bits.view(np.float32))
    if not bool(torch.isfinite(scales).all()):
        raise ProtocolError("non_finite", f"{codec} payload has a NaN or Inf scale")
    return scales


def _level_codes(values: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """(rows, cols) values and (rows,) scales -> (rows, cols) uint8 codes of the nearest of
    ``levels`` evenly spaced levels over ±scale (code c: (2c − (levels − 1)) / (levels − 1))."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    half = (levels - 1) / 2
    # the nearest level's code is round(x / s · half + half) = floor(x / s · half + half + 0.5),
    # within 0..levels - 1 (16 levels: 7.5, 8, 15.5). Divide first: half / s overflows float32
    # for a scale near the smallest normal (x / s never: |x| ≤ s).
    return (values / safe[:, None]).mul_(half).add_(half + 0.5).clamp_(0, levels - 0.5).to(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> bytes:
    # (n,) uint8 codes -> ceil(n / 2) bytes, code 2i in the low nibble; a 0 nibble pads an odd n
    pairs = torch.cat((codes, codes.new_zeros(codes.numel() % 2))).view(-1, 2)
    return _to_bytes(pairs[:, 0] | (pairs[:, 1] << 4), "u1")


def _unpack_levels(blob: bytes, offset: int, count: int) -> torch.Tensor:
    """The levels of ``count`` 4-bit codes packed two per byte from ``offset``: (count,) float32."""
    packed = torch.from_numpy(
        np.frombuffer(blob, dtype=np.uint8, offset=offset, count=(count + 1) // 2).astype(np.int32))
    return torch.index_select(_INT4_PAIRS, 0, packed).reshape(-1)[:count]


@dataclass(frozen=True)
class _Bf16BlockCodec:
    """What :class:`Int4BlockCodec` and :class:`Int3BlockCodec` share: blocks of ``block``
    elements, each with one bfloat16 scale ``s`` (the block's absmax rounded up to bfloat16),
    written first as the upper 16 bits of little-endian float32; each element becomes the nearest
    of ``LEVELS`` evenly spaced levels over ±s. The subclass packs the codes."""

    name: str = ""
    block: int = 64
    LEVELS: ClassVar[int] = 16

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"{self.name} block must be >= 1")

    def _nblocks(self, numel: int) -> int:
        return (numel + self.block - 1) // self.block

    def _codes(self, tensor: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The scales' bytes and the (numel,) uint8 codes of ``tensor``, on its own device."""
        flat = _flat_f32(tensor)
        numel = flat.numel()
        if numel % self.block:
            flat = torch.nn.functional.pad(flat, (0, self.block - numel % self.block))
        blocks = flat.view(-1, self.block)  # (nblocks, block)
        scales = _bf16_ceil(blocks.abs().amax(dim=1))  # (nblocks,)
        return _bf16_bytes(scales), _level_codes(blocks, scales, self.LEVELS).reshape(-1)[:numel]

    def _scaled(self, blob: bytes, levels: torch.Tensor, numel: int) -> torch.Tensor:
        """``levels`` (numel,) in ±1, each times its block's scale from the head of ``blob``."""
        return _scale_blocks(levels, _read_bf16(blob, self._nblocks(numel), self.name), self.block)


@dataclass(frozen=True)
class Int4BlockCodec(_Bf16BlockCodec):
    """Blockwise absmax 4-bit: per block of ``block`` elements one bfloat16 scale, then 4-bit codes.

    The scale ``s`` is the block's absmax rounded up to bfloat16; element ``x`` becomes the nearest
    of the 16 levels ``s · (2c − 15) / 15``, so ``|error| ≤ s / 15``. Layout: ``scales (nblocks,)``
    as the upper 16 bits of little-endian float32, then ``ceil(numel / 2)`` bytes, two codes per
    byte (element 2i in the low nibble); the high nibble after an odd last element is ignored.
    """

    name: str = "int4"
    block: int = INT4_BLOCK
    LEVELS: ClassVar[int] = 16

    def encoded_bytes(self, numel: int) -> int:
        return 2 * self._nblocks(numel) + (numel + 1) // 2

    def encode(self, tensor: torch.Tensor) -> bytes:
        scales, codes = self._codes(tensor)
        return scales + _pack_nibbles(codes)

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        return self._scaled(blob, _unpack_levels(blob, 2 * self._nblocks(numel), numel), numel)


INT3_BLOCK = 64  # elements per bfloat16 scale: 3/8 + 2/64 bytes per element, 1/9.8 of fp32


@dataclass(frozen=True)
class Int3BlockCodec(_Bf16BlockCodec):
    """Blockwise absmax 3-bit: per block of ``block`` elements one bfloat16 scale, then 3-bit codes.

    As :class:`Int4BlockCodec` with 8 levels ``s · (2c − 7) / 7``, so ``|error| ≤ s / 7``; the
    first codec under 1/8 of fp32's bytes that keeps every element. Layout: ``scales (nblocks,)``
    as the upper 16 bits of little-endian float32, then every 8 codes (element 8i + j in bits
    3j..3j+2 of a 24-bit little-endian word) in 3 bytes; codes past the last element are ignored.
    """

    name: str = "int3"
    block: int = INT3_BLOCK
    LEVELS: ClassVar[int] = 8

    def encoded_bytes(self, numel: int) -> int:
        return 2 * self._nblocks(numel) + 3 * ((numel + 7) // 8)

    def encode(self, tensor: torch.Tensor) -> bytes:
        scales, codes = self._codes(tensor)
        c = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 8)).view(-1, 8)  # (groups, 8) uint8
        # the 24-bit word c0 | c1 << 3 | ... | c7 << 21 as its three bytes, built in bytes
        packed = torch.stack((c[:, 0] | (c[:, 1] << 3) | ((c[:, 2] & 3) << 6),
                              (c[:, 2] >> 2) | (c[:, 3] << 1) | (c[:, 4] << 4) | ((c[:, 5] & 1) << 7),
                              (c[:, 5] >> 1) | (c[:, 6] << 2) | (c[:, 7] << 5)), dim=1)
        return scales + _to_bytes(packed.reshape(-1), "u1")

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        groups = (numel + 7) // 8
        raw = _over(blob, "u1", offset=2 * self._nblocks(numel), count=3 * groups).view(groups, 3)
        b0, b1, b2 = raw[:, 0], raw[:, 1], raw[:, 2]
        # the 24-bit word b0 | b1 << 8 | b2 << 16 cut into its eight 3-bit codes, in bytes
        codes = torch.empty((groups, 8), dtype=torch.uint8)
        codes[:, 0] = b0 & 7
        codes[:, 1] = (b0 >> 3) & 7
        codes[:, 2] = (b0 >> 6) | ((b1 & 1) << 2)
        codes[:, 3] = (b1 >> 1) & 7
        codes[:, 4] = (b1 >> 4) & 7
        codes[:, 5] = (b1 >> 7) | ((b2 & 3) << 1)
        codes[:, 6] = (b2 >> 2) & 7
        codes[:, 7] = b2 >> 5
        # code c is the level (2c − 7) / 7, computed in float32 (tests pin it bit for bit)
        levels = codes.reshape(-1)[:numel].to(torch.float32).mul_(2).sub_(7).div_(7)
        return self._scaled(blob, levels, numel)


@dataclass(frozen=True)
class TopKCodec:
    """Top-k by magnitude within blocks, 4-bit values: the ``kept`` largest entries of each block of
    ``block`` elements (of a last partial block of ``r``: ``ceil(r · kept / block)``) are sent, the
    rest as zero, for error feedback to send later.

    Each kept entry is its offset in the block (one byte) and an int4 code of the block's scale
    (as :class:`Int4BlockCodec`: ``|error| ≤ scale / 15``). Layout: ``scales (nblocks,)`` bfloat16,
    ``offsets (K,) uint8`` (strictly increasing within each block, blocks in order), then the K
    codes packed two per byte. K and the blocks follow from ``numel`` alone, so the length is
    exact; a decoder refuses an offset beyond its block, repeated or out of order (``bad_index``).
    """

    name: str = "topk"
    block: int = TOPK_BLOCK
    kept: int = TOPK_KEPT

    def __post_init__(self) -> None:
        if not 1 <= self.kept <= self.block <= 256:
            raise ValueError("topk needs 1 <= kept <= block <= 256 (offsets are one byte)")

    def _layout(self, numel: int) -> tuple[int, int, int]:
        """(full blocks, elements of the last partial block, entries kept of it)."""
        full, rest = divmod(numel, self.block)
        return full, rest, -(-rest * self.kept // self.block)

    def encoded_bytes(self, numel: int) -> int:
        full, rest, kept_rest = self._layout(numel)
        kept = full * self.kept + kept_rest
        return 2 * (full + (rest > 0)) + kept + (kept + 1) // 2

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = _flat_f32(tensor)
        full, rest, kept_rest = self._layout(flat.numel())
        groups = []  # (blocks, kept of each): the full blocks, then the partial one
        if full:
            groups.append((flat[: full * self.block].view(full, self.block), self.kept))
        if rest:
            groups.append((flat[full * self.block:].view(1, rest), kept_rest))
        if not groups:
            return b""
        offsets, values = [], []
        for blocks, kept in groups:
            top = blocks.abs().topk(kept, dim=1, sorted=False).indices.sort(dim=1).values  # (n, kept)
            offsets.append(top)
            values.append(blocks.gather(1, top))
        scales = [_bf16_ceil(v.abs().amax(dim=1)) for v in values]
        codes = torch.cat([_level_codes(v, s, 16).reshape(-1) for v, s in zip(values, scales, strict=True)])
        return (_bf16_bytes(torch.cat(scales)) + _to_bytes(torch.cat([o.reshape(-1) for o in offsets]), "u1")
                + _pack_nibbles(codes))

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        full, rest, kept_rest = self._layout(numel)
        nblocks, kept = full + (rest > 0), full * self.kept + kept_rest
        scales = _read_bf16(blob, nblocks, self.name)
        offsets = torch.from_numpy(
            np.frombuffer(blob, dtype=np.uint8, offset=2 * nblocks, count=kept).astype(np.int64))
        levels = _unpack_levels(blob, 2 * nblocks + kept, kept)
        groups = [(offsets[: full * self.kept].view(full, self.kept), self.block)] if full else []
        if rest:
            groups.append((offsets[full * self.kept:].view(1, kept_rest), rest))
        for group, length in groups:
            if not bool((group[:, 1:] > group[:, :-1]).all()) or int(group[:, -1].max()) >= length:
                raise ProtocolError("bad_index", f"{self.name} payload has an offset beyond its block, "
                                                 "repeated or out of order")
        per_block = torch.full((nblocks,), self.kept, dtype=torch.int64)
        if rest:
            per_block[-1] = kept_rest
        block_of = torch.repeat_interleave(torch.arange(nblocks), per_block)  # (kept,)
        out = torch.zeros(numel, dtype=torch.float32)
        out[block_of * self.block + offsets] = levels * scales[block_of]
        return out


Codec = Fp32Codec | Fp16Codec | Int8BlockCodec | Int4BlockCodec | Int3BlockCodec | TopKCodec

CODECS: dict[str, Codec] = {
    c.name: c
    for c in (Fp32Codec(), Fp16Codec(), Int8BlockCodec(), Int4BlockCodec(), Int3BlockCodec(), TopKCodec())
}


def get_codec(name: str) -> Codec:
    """Return the codec called ``name``; raise :class:`ProtocolError` ("unknown_codec") if none."""
    try:
        return CODECS[name]
    except KeyError:
        raise ProtocolError(
            "unknown_codec", f"codec {name!r} unknown (known: {', '.join(sorted(CODECS))})"
        ) from None
