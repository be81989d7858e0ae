"""Patches between snapshot versions: a client a version or a few behind downloads a few bits per
parameter instead of the whole fp32 snapshot.

With each version ``v`` it publishes after another (``v − 1``), the coordinator writes the patch
``P_v = C(θ_v − θ̂_{v−1})`` (``C`` a block codec, int4 by default: 0.53 bytes a parameter, 0.13 × fp32)
and keeps ``θ̂_v = θ̂_{v−1} + D(P_v)``: error feedback on the coordinator's side, so θ̂ stays within
one quantisation residual of θ and the error never piles up, however long a client follows the
patches. A client that holds version ``u`` and finds ``v > u`` current reads ``P_{u+1} … P_v`` and
adds them to its θ_base, which is then ``θ̂_v + (θ_u − θ̂_u)`` if it read ``u`` whole: off ``θ_v`` by at
most two residuals. That offset only moves where its round starts: its delta ``θ_start − θ_end`` is
a true pseudo-gradient of that start, and the coordinator applies it to the exact θ.

A patch lives under its version's keys (one cluster slot: it is dropped with the version). Its
manifest is signed like a snapshot's and names what it applies to (version ``v − 1`` with that
manifest's ``created_at``), its codec and every chunk's sha256. A client checks all of that, for
every patch it needs, before it touches θ_base, and reads the whole snapshot instead when a patch
is missing, unsigned or does not chain (:meth:`client.replica.Replica.patch_to`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import msgpack
import torch

from shared import PROTOCOL_VERSION
from shared.codecs import Codec, get_codec
from shared.errors import ProtocolError, SnapshotError, SnapshotMissing, SnapshotUntrusted
from shared.protocol import check_protocol, require_field, unpack_limited
from shared.settings import redis_bytes
from shared.snapshot import SnapshotStore
from shared.snapshot_layout import (
    MAX_MANIFEST_BYTES,
    MAX_SNAPSHOT_BYTES,
    SnapshotManifest,
)

# Codecs a patch may use: block codecs whose decoders bound every value by their block's scale.
PATCH_CODECS = ("int8", "int4")
DEFAULT_PATCH_CODEC = "int4"
MAX_PATCH_NAME_CHARS = 4096


@dataclass(frozen=True)
class PatchManifest:
    """What one patch holds (``params``: (name, numel) in the snapshot's order, each tensor's
    encoded bytes one after the other) and which snapshot it turns into which."""

    run: str
    run_id: str
    version: int
    base_version: int
    base_created_at: float  # the base snapshot's manifest stamp
    created_at: float  # the stamp of version ``version``'s manifest
    codec: str
    params: tuple[tuple[str, int], ...]
    chunk_bytes: int
    chunk_sha256: tuple[str, ...] = ()  # filled in by write_patch

    @property
    def codec_impl(self) -> Codec:
        return get_codec(self.codec)

    def sizes(self) -> list[int]:
        codec = self.codec_impl
        return [codec.encoded_bytes(numel) for _, numel in self.params]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes())

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "protocol": PROTOCOL_VERSION,
                "type": "patch",
                "run": self.run,
                "run_id": self.run_id,
                "version": self.version,
                "base_version": self.base_version,
                "base_created_at": self.base_created_at,
                "created_at": self.created_at,
                "codec": self.codec,
                "params": [[name, numel] for name, numel in self.params],
                "chunk_bytes": self.chunk_bytes,
                "chunk_sha256": list(self.chunk_sha256),
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> PatchManifest:
        obj = check_protocol(
            unpack_limited(data, max_bytes=MAX_MANIFEST_BYTES, max_items=100_000,
                           max_str=MAX_PATCH_NAME_CHARS)
        )
        if obj.get("type") != "patch":
            raise ProtocolError("wrong_schema", "not a snapshot patch manifest")
        params = []
        for item in require_field(obj, "params", list):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], int) and not isinstance(item[1], bool) and 0 <= item[1] < 2**40):
                raise ProtocolError("wrong_schema", "bad patch parameter entry")
            params.append((item[0], item[1]))
        codec = require_field(obj, "codec", str)
        if codec not in PATCH_CODECS:
            raise ProtocolError("unknown_codec", f"patch codec {codec[:32]!r} is not one of {PATCH_CODECS}")
        hashes = require_field(obj, "chunk_sha256", list)
        if not all(isinstance(h, str) for h in hashes):
            raise ProtocolError("wrong_schema", "bad chunk hash")
        manifest = cls(
            run=require_field(obj, "run", str),
            run_id=require_field(obj, "run_id", str),
            version=require_field(obj, "version", int),
            base_version=require_field(obj, "base_version", int),
            base_created_at=float(require_field(obj, "base_created_at", (int, float))),
            created_at=float(require_field(obj, "created_at", (int, float))),
            codec=codec,
            params=tuple(params),
            chunk_bytes=require_field(obj, "chunk_bytes", int),
            chunk_sha256=tuple(hashes),
        )
        if manifest.chunk_bytes <= 0 or manifest.total_bytes > MAX_SNAPSHOT_BYTES:
            raise ProtocolError("wrong_schema", "bad chunk size or patch too large")
        if len(manifest.chunk_sha256) != -(-manifest.total_bytes // manifest.chunk_bytes):
            raise ProtocolError("wrong_schema", "chunk count does not match the patch's bytes")
        return manifest

    def fits(self, target: SnapshotManifest) -> bool:
        """True if this patch is for ``target``'s run, version and parameters (names and sizes, in
        order) and was written with it (the same stamp)."""
        return (self.run == target.run and self.run_id == target.run_id and self.version == target.version
                and self.created_at == target.created_at
                and self.params == tuple((p.name, p.numel) for p in target.params))


def write_patch(store: SnapshotStore, manifest: PatchManifest, blobs: list[bytes]) -> PatchManifest:
    """Write the patch ``blobs`` (one per parameter of ``manifest.params``, encoded by its codec)
    a few chunks per round trip, then its manifest, signed, with their hashes; return it."""
    version = manifest.version
    pipe = store.redis.pipeline(transaction=False)
    digests = store.write_chunks(pipe, lambda index: store.keys.patch_chunk(version, index),
                                 [memoryview(b) for b in blobs], manifest.chunk_bytes)
    manifest = replace(manifest, chunk_sha256=digests)
    # after every chunk: a manifest that is there names chunks that are there
    pipe.set(store.keys.patch_manifest(version), store.signed(manifest.encode()))
    pipe.execute()
    return manifest


def read_patch_manifest(store: SnapshotStore, version: int) -> PatchManifest:
    """The signed manifest of the patch to ``version``: :class:`SnapshotMissing` if there is none,
    :class:`SnapshotUntrusted` if it is not signed by the store's key or names another version."""
    raw = redis_bytes(store.redis.get(store.keys.patch_manifest(version)))
    if raw is None:
        raise SnapshotMissing(f"no patch to version {version}")
    body = store.open_envelope(raw, f"the patch to version {version}", max_body_bytes=MAX_MANIFEST_BYTES)
    try:
        manifest = PatchManifest.decode(body)
    except ProtocolError as exc:
        raise SnapshotError(f"the patch to version {version} is invalid: {exc}") from exc
    if manifest.version != version or manifest.base_version != version - 1 or manifest.run != store.keys.run:
        raise SnapshotUntrusted(f"the patch under version {version} names another one "
                                f"({manifest.base_version} → {manifest.version}); refusing it")
    return manifest


def read_patch_bytes(store: SnapshotStore, manifest: PatchManifest) -> bytearray:
    """The patch's encoded bytes, every chunk checked against the signed manifest as it comes."""
    return store.read_chunks(lambda index: store.keys.patch_chunk(manifest.version, index),
                             manifest.chunk_sha256, chunk_bytes=manifest.chunk_bytes,
                             total_bytes=manifest.total_bytes, what=f"the patch to {manifest.version}")


def increments(manifest: PatchManifest, buffer: bytearray) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, flat float32 increment) of each parameter of a verified patch, one at a time."""
    codec = manifest.codec_impl
    view = memoryview(buffer)
    offset = 0
    for (name, numel), size in zip(manifest.params, manifest.sizes(), strict=True):
        try:
            yield name, codec.decode(bytes(view[offset : offset + size]), numel)
        except ProtocolError as exc:
            raise SnapshotError(f"the patch to {manifest.version} does not decode ({name}: {exc})") from exc
        offset += size
