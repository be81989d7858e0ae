"""The coordinator's side of snapshot patches (:mod:`shared.snapshot_patch`): θ̂, the model that a
client following the patches holds, and the patch from it to each new θ that is published.

θ̂ costs one fp32 copy of the model in the coordinator's memory (``--snapshot-patches none``
saves it, and every client then downloads whole snapshots). It is not checkpointed: after a
restart, or a publish that failed, the next published version has no patch and θ̂ starts again
from θ (a client still on the old chain reads that version whole).
"""

from __future__ import annotations

import torch

from shared.codecs import get_codec
from shared.snapshot_layout import DEFAULT_CHUNK_BYTES
from shared.snapshot_patch import PatchManifest


class PatchMaker:
    """Encodes ``C(θ_v − θ̂_{v−1})`` for each version published right after another and keeps θ̂."""

    def __init__(self, codec: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.codec_name = codec
        self.codec = get_codec(codec)
        self.chunk_bytes = chunk_bytes
        self._served: dict[str, torch.Tensor] | None = None  # θ̂ of version self._version
        self._version = -1
        self._created_at = 0.0

    def patch(self, *, run: str, run_id: str, version: int, created_at: float,
              params: dict[str, torch.Tensor]) -> tuple[PatchManifest, list[bytes]] | None:
        """The patch to ``version`` (θ = ``params``), or None when the last version published was
        not ``version − 1`` (then θ̂ starts again from θ). Moves θ̂ to the new version: call
        :meth:`published` once the snapshot is out, :meth:`forget` if its publish failed."""
        if self._served is None or version != self._version + 1 or set(params) != set(self._served):
            if version == self._version and self._served is not None:
                return None  # a republish of the same θ: θ̂ still follows it
            self._served = None  # first: never two extra copies at once
            self._served = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}
            return None
        blobs = []
        for name, theta in params.items():
            served = self._served[name]
            blob = self.codec.encode(theta.detach().to("cpu", torch.float32) - served)
            served.add_(self.codec.decode(blob, served.numel()).view_as(served))
            blobs.append(blob)
        manifest = PatchManifest(
            run=run, run_id=run_id, version=version, base_version=version - 1,
            base_created_at=self._created_at, created_at=created_at, codec=self.codec_name,
            params=tuple((n, p.numel()) for n, p in params.items()), chunk_bytes=self.chunk_bytes,
        )
        return manifest, blobs

    @property
    def served(self) -> dict[str, torch.Tensor]:
        """θ̂: what a client that followed every patch holds (read only)."""
        if self._served is None:
            raise RuntimeError("no version published yet")
        return self._served

    def published(self, version: int, created_at: float) -> None:
        """Snapshot ``version`` (stamped ``created_at``) is out: the next patch starts from it."""
        self._version, self._created_at = version, created_at

    def forget(self) -> None:
        """A publish failed: whatever clients hold, the next patch cannot name it."""
        self._served, self._version = None, -1
