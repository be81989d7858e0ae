"""Versioned model snapshots in Redis: immutable chunks, a manifest, one atomic pointer flip.

Publishing version ``v`` writes the chunks of the flat parameter bytes and then the manifest under
``v``'s own keys (never rewritten), and only then moves ``current`` to ``v`` (a compare-and-set that
never moves it backwards). A reader takes ``current``, reads that version's manifest and chunks, and
checks every chunk's sha256 against the manifest, so it can never load a torn or mixed snapshot; if a
chunk expired under it, it starts again from the new ``current``. The newest ``keep_versions`` are
kept, counting the one being written: publishing ``v`` first deletes ``v - keep_versions`` (with
``keep_versions`` 1, only after the flip: readers are on it until then). So Redis holds at most
``keep_versions`` snapshots, and a reader has until the ``keep_versions``-th newer version starts
to be written to read one whole. The chunks are written straight from the tensors' memory, a few
at a time, never as one serialized copy of the model.

A version's keys share one Redis Cluster slot (a hash tag, :meth:`shared.keys.RunKeys.snapshot_key`),
so its chunks are read with MGET and deleted with DEL on a cluster too. ``current`` and the chunks
are read through one connection: from a replica, the replication stream brings the chunks and the
manifest before the flip that names them, so a reader never sees a pointer ahead of its snapshot.

The manifest and the round plan are stored signed (:class:`shared.signing.SignedEnvelope`): a
store with a ``verify_key`` (a client's) refuses, with :class:`SnapshotUntrusted`, anything that is
not signed by that key, a signed manifest found under another version's key, and a chunk that
fails the signed manifest's hash. ``current`` itself is not signed: a pointer rewritten in Redis
can only name a version whose signed manifest is there (see ``client/fetcher.py`` for rollbacks).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import torch

from shared import PROTOCOL_VERSION
from shared.errors import (
    ProtocolError,
    ProtocolVersionError,
    SnapshotError,
    SnapshotMissing,
    SnapshotOtherProtocol,
    SnapshotUntrusted,
)
from shared.keys import RunKeys
from shared.protocol import unpack_limited
from shared.round_plan import PLAN_MAX_BYTES, RoundPlan
from shared.settings import redis_bytes
from shared.signing import SigningKey, VerifyKey, open_signed, seal
from shared.snapshot_layout import (
    DEFAULT_CHUNK_BYTES,
    MAX_MANIFEST_BYTES,
    SnapshotManifest,
    byte_views,
    chunked,
    tensors_over,
)

PIPELINE_CHUNKS = 8  # chunks written per round trip: at most 32 MiB in flight
MAX_PLAN_BYTES = PLAN_MAX_BYTES  # RoundPlan.decode's own limit

# Chunks asked for in one MGET: few round trips, and few chunk copies held besides the model's bytes.
CHUNKS_PER_READ = 4

# Move ``current`` forward only: a stale coordinator can never roll readers back. ARGV[2] == '1'
# (a republish of the same version) also accepts a pointer already at ARGV[1].
_FLIP_FORWARD = """
local old = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if old < new or (ARGV[2] == '1' and old == new) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass
class Snapshot:
    manifest: SnapshotManifest
    params: dict[str, torch.Tensor]

    @property
    def version(self) -> int:
        return self.manifest.version


class SnapshotStore:
    """Publishes and reads snapshots of one run in Redis (the connection is passed in).

    ``signer`` (the coordinator's key) signs what :meth:`publish` and :meth:`publish_plan` write;
    a store without one cannot publish. ``verify_key`` (the key a client pinned) is checked on
    every manifest and plan read; without one (the coordinator reading back its own writes, test
    probes) an envelope is only unwrapped. ``expire_grace_s`` (0: none) lets a version pushed out
    of the newest ``keep_versions`` live that much longer, for slow readers, at the cost of every
    version published meanwhile staying in Redis memory too.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RunKeys,
        *,
        keep_versions: int = 3,
        expire_grace_s: int = 0,
        signer: SigningKey | None = None,
        verify_key: VerifyKey | None = None,
    ) -> None:
        if keep_versions < 1:
            raise SnapshotError("keep_versions must be >= 1")
        self.redis = client
        self.keys = keys
        self.keep_versions = keep_versions
        self.expire_grace_s = expire_grace_s
        self.signer = signer
        self.verify_key = verify_key
        self._flip = client.register_script(_FLIP_FORWARD)

    def signer_key(self) -> SigningKey:
        if self.signer is None:
            raise SnapshotError("this snapshot store has no signing key: only the coordinator publishes")
        return self.signer

    def signed(self, body: bytes) -> bytes:
        """``body`` in an envelope signed by this store's key (the coordinator's)."""
        return seal(body, self.signer_key())

    def open_envelope(self, raw: bytes, what: str, *, max_body_bytes: int) -> bytes:
        """The body of the envelope ``raw`` (the signature checked if there is a verify key)."""
        try:
            return open_signed(raw, self.verify_key, max_body_bytes=max_body_bytes)
        except ProtocolVersionError as exc:
            raise SnapshotOtherProtocol(f"{what} is in protocol {exc.theirs}, this program speaks "
                                        f"{exc.ours}", theirs=exc.theirs) from exc
        except ProtocolError as exc:
            if self.verify_key is None:
                raise SnapshotUntrusted(f"{what} is not a signed envelope ({exc})") from exc
            raise SnapshotUntrusted(
                f"{what} is not signed by this run's coordinator (key {self.verify_key.short}); "
                f"refusing it ({exc.reason})"
            ) from exc

    def current_version(self) -> int | None:
        raw = self.redis.get(self.keys.current)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError as exc:
            raise SnapshotError(f"{self.keys.current} holds {raw[:32]!r}, not a version") from exc

    def publish(
        self,
        *,
        run_id: str,
        version: int,
        params: dict[str, torch.Tensor],
        config: dict[str, Any],
        progress: dict[str, Any],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        before_flip: Callable[[], None] | None = None,
        republish: bool = False,
        created_at: float | None = None,
    ) -> SnapshotManifest:
        """Write version ``version`` whole, then flip ``current`` to it (never backwards).

        ``republish``: ``current`` may already be ``version``; its keys are rewritten in place.
        Only for the same parameters as before (a reader then sees the same chunk bytes under
        either manifest); the coordinator uses it when Redis lost that version's keys.

        ``created_at`` (default: now) stamps the manifest; a patch to this version names it.

        ``before_flip`` (fault tests only) is called between the chunk/manifest writes and the
        pointer flip: a crash there must leave readers on the previous version.
        """
        self.signer_key()  # before anything is written
        if chunk_bytes < 1:
            raise SnapshotError("chunk_bytes must be >= 1")
        entries, views = byte_views(params)
        old = version - self.keep_versions
        if old < version - 1:  # not the version readers are on now (keep_versions >= 2)
            self._drop(old)  # first: Redis then never holds more than keep_versions snapshots
        # Chunk by chunk from θ's own memory, a few per round trip: the serialized snapshot never
        # exists whole in this process (a commit's memory stays near the steady one).
        pipe = self.redis.pipeline(transaction=False)
        digests = self.write_chunks(pipe, lambda index: self.keys.chunk(version, index), views, chunk_bytes)
        manifest = SnapshotManifest(
            run=self.keys.run,
            run_id=run_id,
            version=version,
            params=entries,
            chunk_bytes=chunk_bytes,
            chunk_sha256=tuple(digests),
            config=config,
            progress=progress,
            created_at=time.time() if created_at is None else created_at,
        )
        pipe.set(self.keys.manifest(version), self.signed(manifest.encode()))  # after every chunk
        pipe.execute()
        if before_flip is not None:
            before_flip()
        if not self._flip(keys=[self.keys.current], args=[version, int(republish)]):
            raise SnapshotError(
                f"Redis already points at a version >= {version}; another coordinator may be "
                "running this run"
            )
        if old == version - 1:  # keep_versions 1: readers were on it until the flip
            self._drop(old)
        return manifest

    def _drop(self, old: int) -> None:
        """Delete version ``old``, manifest and chunks (at once, or after ``expire_grace_s`` if
        that is set)."""
        if old < 0:
            return
        self._drop_keys(self.keys.manifest(old), lambda i: self.keys.chunk(old, i), one_slot=True)
        self._drop_keys(self.keys.patch_manifest(old), lambda i: self.keys.patch_chunk(old, i), one_slot=True)
        # The same version as a coordinator from before hash-tagged keys wrote it (one upgraded in
        # place left up to keep_versions of them): its keys lie in different cluster slots.
        self._drop_keys(self.keys.legacy_snapshot(old, "manifest"),
                        lambda i: self.keys.legacy_snapshot(old, f"chunk:{i}"), one_slot=False)

    def _drop_keys(self, manifest_key: str, chunk_key: Callable[[int], str], *, one_slot: bool) -> None:
        """Delete (or expire) the manifest at ``manifest_key`` (a snapshot's or a patch's) and the
        chunks it counts; ``one_slot``: the keys share a cluster slot, so one DEL may name many."""
        raw = redis_bytes(self.redis.get(manifest_key))
        if raw is None:
            return
        try:
            obj = unpack_limited(open_signed(raw, None), max_bytes=MAX_MANIFEST_BYTES, max_items=100_000,
                                 max_str=4096)
            hashes = obj.get("chunk_sha256") if isinstance(obj, dict) else None
            count = len(hashes) if isinstance(hashes, list) else 0
        except ProtocolError:
            count = 0
        keys = [manifest_key] + [chunk_key(i) for i in range(count)]
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(keys), 512):
            batch = keys[start : start + 512]
            if self.expire_grace_s:
                for key in batch:
                    pipe.expire(key, self.expire_grace_s)
            elif one_slot:
                # DEL frees at once (UNLINK would lag); not in the pipeline: a cluster's pipeline
                # takes one key per DEL, the cluster client itself one slot's keys
                self.redis.delete(*batch)
            else:
                for key in batch:
                    pipe.delete(key)
        pipe.execute()

    def read_manifest(self, version: int) -> SnapshotManifest:
        raw = redis_bytes(self.redis.get(self.keys.manifest(version)))
        if raw is None:
            if self.redis.exists(self.keys.legacy_snapshot(version, "manifest")):
                # a coordinator of protocol 2 (snapshot keys without the hash tag) serves the run
                raise SnapshotOtherProtocol(f"snapshot {version} of run {self.keys.run!r} is laid out in "
                                            f"protocol 2, this program speaks {PROTOCOL_VERSION}", theirs=2)
            raise SnapshotMissing(f"snapshot {version} of run {self.keys.run!r} is gone")
        body = self.open_envelope(raw, f"snapshot {version}", max_body_bytes=MAX_MANIFEST_BYTES)
        try:
            manifest = SnapshotManifest.decode(body)
        except ProtocolError as exc:
            raise SnapshotError(f"manifest of version {version} is invalid: {exc}") from exc
        if manifest.version != version or manifest.run != self.keys.run:
            # Signed, but for another key: an old manifest replayed under a newer version's key.
            raise SnapshotUntrusted(
                f"manifest under version {version} names another snapshot (version "
                f"{manifest.version} of run {manifest.run[:64]!r}); refusing it"
            )
        return manifest

    def publish_plan(self, plan: RoundPlan) -> None:
        """Write the round plan, signed, beside the snapshots."""
        self.redis.set(self.keys.plan, self.signed(plan.encode()))

    def read_plan(self) -> RoundPlan | None:
        """The round plan, or None if there is none; SnapshotUntrusted if it is not signed by
        ``verify_key`` (when set), SnapshotError if it is signed but malformed."""
        raw = redis_bytes(self.redis.get(self.keys.plan))
        if raw is None:
            return None
        body = self.open_envelope(raw, "the round plan", max_body_bytes=MAX_PLAN_BYTES)
        try:
            return RoundPlan.decode(body)
        except ProtocolError as exc:
            raise SnapshotError(f"the round plan is invalid: {exc}") from exc

    def read(self, version: int | None = None) -> Snapshot:
        """Read and verify one whole version (the current one by default)."""
        if version is None:
            version = self.current_version()
            if version is None:
                raise SnapshotMissing(f"run {self.keys.run!r} has no snapshot yet")
        manifest = self.read_manifest(version)
        buffer = self.read_chunks(lambda index: self.keys.chunk(version, index), manifest.chunk_sha256,
                                  chunk_bytes=manifest.chunk_bytes, total_bytes=manifest.total_bytes,
                                  what=f"version {version}")
        return Snapshot(manifest, tensors_over(manifest.params, buffer))

    def write_chunks(self, pipe: Any, key_of: Callable[[int], str], views: list[memoryview],
                     chunk_bytes: int) -> tuple[str, ...]:
        """Queue the flat bytes of ``views`` on ``pipe`` as chunks under ``key_of(index)``, sending
        every :data:`PIPELINE_CHUNKS`; their sha256s. Chunk by chunk from the views' own memory:
        the serialized whole never exists in this process (a commit's memory stays near the
        steady one). The caller queues the manifest after them and executes the rest."""
        digests = []
        for index, chunk in enumerate(chunked(views, chunk_bytes)):
            digests.append(hashlib.sha256(chunk).hexdigest())
            pipe.set(key_of(index), chunk)
            if len(pipe) >= PIPELINE_CHUNKS:
                pipe.execute()
        return tuple(digests)

    def read_chunks(self, key_of: Callable[[int], str], sha256: tuple[str, ...], *, chunk_bytes: int,
                    total_bytes: int, what: str) -> bytearray:
        """The chunks ``key_of(0 …)`` joined: each checked against its signed ``sha256`` and size
        and copied into its place as it comes, so that the bytes are held once plus one round
        trip's chunks, never all the chunks and their join besides. :class:`SnapshotMissing` if
        one expired meanwhile, :class:`SnapshotUntrusted` if one fails its hash."""
        keys = [key_of(i) for i in range(len(sha256))]
        buffer = bytearray(total_bytes)
        for start in range(0, len(keys), CHUNKS_PER_READ):
            for index, reply in enumerate(self.redis.mget(keys[start : start + CHUNKS_PER_READ]), start):
                chunk = redis_bytes(reply)
                if chunk is None:
                    raise SnapshotMissing(f"chunk {index} of {what} expired while reading")
                if hashlib.sha256(chunk).hexdigest() != sha256[index]:
                    raise SnapshotUntrusted(f"chunk {index} of {what} fails its sha256")
                at = index * chunk_bytes
                size = min(chunk_bytes, len(buffer) - at)  # the last one is shorter
                if len(chunk) != size:
                    raise SnapshotError(f"chunk {index} of {what} is {len(chunk)} bytes, not the "
                                        f"manifest's {size}")
                buffer[at:at + size] = chunk
        return buffer

    def read_latest(self, *, attempts: int = 5) -> Snapshot:
        """Read the current version, starting over if it expires mid-read."""
        last: SnapshotMissing | None = None
        for _ in range(attempts):
            try:
                return self.read()
            except SnapshotMissing as exc:
                last = exc
                time.sleep(0.05)
        assert last is not None
        raise last
