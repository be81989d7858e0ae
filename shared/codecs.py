"""Delta codecs: how a pseudo-gradient tensor becomes bytes and back.

All codecs decode to float32 on the coordinator, and every decoder checks the exact byte length
against the element count that the *receiver* expects (taken from its own manifest), so a sender
cannot make the receiver allocate more than the model's size.

=========  ===============  ============================================================
codec      bytes / element  worst-case error per element
=========  ===============  ============================================================
fp32       4                0 (exact)
fp16       2                ~2^-11 relative (values beyond ±65504 are refused)
int8       1 + 4/block      absmax(block) / 254 (half a quantisation step)
=========  ===============  ============================================================

Lossy codecs are used with :class:`ErrorFeedback` on the client, so what is lost in one round is
sent in the next instead of being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import ProtocolError

INT8_BLOCK = 256  # elements per absmax block; smaller blocks: less error, more scale bytes


def _as_flat_f32(tensor: torch.Tensor) -> np.ndarray:
    # (numel,) float32, little-endian, on the CPU
    return tensor.detach().to("cpu", torch.float32).reshape(-1).numpy().astype("<f4", copy=False)


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
        flat = _as_flat_f32(tensor)
        if flat.size and float(np.abs(flat).max()) > 65504.0:
            raise ValueError("delta has values beyond the fp16 range; use --codec fp32")
        return flat.astype("<f2").tobytes()

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        return torch.from_numpy(np.frombuffer(blob, dtype="<f2").astype(np.float32))


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
        flat = _as_flat_f32(tensor).astype(np.float32)
        numel = flat.size
        padded = np.zeros(self._nblocks(numel) * self.block, dtype=np.float32)
        padded[:numel] = flat
        blocks = padded.reshape(-1, self.block)  # (nblocks, block)
        scales = np.abs(blocks).max(axis=1) / 127.0  # (nblocks,)
        safe = np.where(scales > 0, scales, 1.0)[:, None]
        q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(-1)[:numel]
        return scales.astype("<f4").tobytes() + q.tobytes()

    def decode(self, blob: bytes, numel: int) -> torch.Tensor:
        _expect_len(blob, self.encoded_bytes(numel), self.name)
        nblocks = self._nblocks(numel)
        scales = np.frombuffer(blob, dtype="<f4", count=nblocks).astype(np.float32)
        q = np.frombuffer(blob, dtype=np.int8, offset=4 * nblocks, count=numel)
        padded = np.zeros(nblocks * self.block, dtype=np.float32)
        padded[:numel] = q
        values = (padded.reshape(-1, self.block) * scales[:, None]).reshape(-1)[:numel]
        return torch.from_numpy(np.ascontiguousarray(values))


Codec = Fp32Codec | Fp16Codec | Int8BlockCodec

CODECS: dict[str, Codec] = {c.name: c for c in (Fp32Codec(), Fp16Codec(), Int8BlockCodec())}


def get_codec(name: str) -> Codec:
    """Return the codec called ``name``; raise :class:`ProtocolError` ("unknown_codec") if none."""
    try:
        return CODECS[name]
    except KeyError:
        raise ProtocolError(
            "unknown_codec", f"codec {name!r} unknown (known: {', '.join(sorted(CODECS))})"
        ) from None


class ErrorFeedback:
    """Carries the compression error of each tensor into the next round.

    ``encode(name, g)`` sends ``C(g + e)`` and keeps ``e ← (g + e) − D(C(g + e))``. With a lossless
    codec ``e`` stays zero. The residual lives on the CPU in float32 (same size as the model).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residual: dict[str, torch.Tensor] = {}

    def encode(self, name: str, delta: torch.Tensor) -> bytes:
        flat = delta.detach().to("cpu", torch.float32).reshape(-1)
        if isinstance(self.codec, Fp32Codec):
            return self.codec.encode(flat)
        corrected = flat + self._residual.get(name, torch.zeros_like(flat))
        blob = self.codec.encode(corrected)
        self._residual[name] = corrected - self.codec.decode(blob, corrected.numel())
        return blob

    def reset(self) -> None:
        self._residual.clear()

    def residual_norm(self) -> float:
        return float(sum(float(r.pow(2).sum()) for r in self._residual.values()) ** 0.5)
