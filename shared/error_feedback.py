"""Error feedback: what a lossy codec drops from one round's delta is sent in the next.

Without it, a codec's rounding is lost for good every round; with it, the client keeps the
difference between what it meant to send and what the coordinator will decode, and adds it to the
next round's delta. That is what lets the clients' default, ``int3`` (about a tenth of fp32's
bytes), train as fp32 does (docs/BENCHMARKS.md, ``benchmarks/codecs.py``).
"""

from __future__ import annotations

import torch

from shared.codecs import Codec, Fp32Codec


class ErrorFeedback:
    """Carries the compression error of each tensor into the next round.

    ``encode(name, g)`` sends ``C(g + e)`` and keeps ``e ← (g + e) − D(C(g + e))``. With a lossless
    codec ``e`` stays zero. The residual lives where ``g`` is (a GPU's delta is corrected and
    quantised there: only the encoded bytes reach the host), in float32, the model's size. A
    ``g + e`` with a NaN or an Inf (a diverged round) is sent as it is, for the coordinator to
    refuse, and leaves no residual: one bad round must not poison every later one.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residual: dict[str, torch.Tensor] = {}

    def encode(self, name: str, delta: torch.Tensor) -> bytes:
        flat = delta.detach().to(torch.float32).reshape(-1)
        if isinstance(self.codec, Fp32Codec):
            return self.codec.encode(flat)
        residual = self._residual.get(name)
        corrected = flat + residual.to(flat.device) if residual is not None else flat
        blob = self.codec.encode(corrected)
        if not bool(torch.isfinite(corrected).all()):
            self._residual.pop(name, None)
            return blob
        decoded = self.codec.decode(blob, corrected.numel()).to(corrected.device, non_blocking=True)
        self._residual[name] = corrected - decoded
        return blob

    def reset(self) -> None:
        self._residual.clear()

    def residual_norm(self) -> float:
        return float(sum(float(r.pow(2).sum()) for r in self._residual.values()) ** 0.5)
