"""Snapshot patches without servers: the manifest's encoding and limits, and the coordinator's θ̂,
whose error feedback keeps a client that follows the patches close to θ however long it follows."""

from __future__ import annotations

import msgpack
import pytest
import torch

from coordinator.patches import PatchMaker
from shared import PROTOCOL_VERSION
from shared.errors import ProtocolError
from shared.snapshot_layout import ParamEntry, SnapshotManifest
from shared.snapshot_patch import PatchManifest, increments

SHAPES = {"w": (64, 48), "b": (48,), "scale": ()}


def model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def walk(versions: int, step: float = 0.01, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """θ_0 … θ_{versions}: a random walk, each version a step of about ``step`` per element."""
    gen = torch.Generator().manual_seed(seed)
    thetas = [model(seed)]
    for _ in range(versions):
        thetas.append({n: t + step * torch.randn(t.shape, generator=gen) for n, t in thetas[-1].items()})
    return thetas


def follow(maker: PatchMaker, thetas: list[dict[str, torch.Tensor]]) -> list[float]:
    """A client that read θ_0 whole and then applies each patch: its largest error at each version."""
    held = {n: t.clone() for n, t in thetas[0].items()}
    assert maker.patch(run="r", run_id="id", version=0, created_at=0.0, params=thetas[0]) is None
    maker.published(0, 0.0)
    errors = []
    for version, theta in enumerate(thetas[1:], start=1):
        made = maker.patch(run="r", run_id="id", version=version, created_at=float(version), params=theta)
        assert made is not None
        manifest, blobs = made
        maker.published(version, float(version))
        for name, increment in increments(manifest, bytearray(b"".join(blobs))):
            held[name] += increment.view_as(held[name])
        errors.append(max(float((held[n] - theta[n]).abs().max()) for n in theta))
    return errors


@pytest.mark.parametrize("codec", ["int4", "int8"])
def test_a_client_following_patches_stays_within_one_residual_of_theta_for_ever(codec: str) -> None:
    thetas = walk(80, step=0.01)
    errors = follow(PatchMaker(codec), thetas)
    # one residual of a patch of a version step (plus the residual it carries): int4's half step is
    # absmax/15, absmax ≈ 4 σ of the 0.01 step; int8's absmax/254
    bound = 0.01 * 4.5 * (1 / 15 if codec == "int4" else 1 / 254) * 1.5
    assert max(errors) <= bound, (max(errors), bound)
    # and it does not pile up: the last twenty versions are no further off than the first twenty
    assert max(errors[-20:]) <= 1.5 * max(errors[:20])


def test_without_the_coordinators_error_feedback_the_error_would_pile_up() -> None:
    """The control: the same int4 patches of θ_v − θ_{v−1} (no θ̂) drift as a random walk."""
    thetas = walk(80, step=0.01)
    maker = PatchMaker("int4")
    held = {n: t.clone() for n, t in thetas[0].items()}
    for previous, theta in zip(thetas, thetas[1:], strict=False):
        for name in held:
            diff = theta[name] - previous[name]
            held[name] += maker.codec.decode(maker.codec.encode(diff), diff.numel()).view_as(diff)
    naive = max(float((held[n] - thetas[-1][n]).abs().max()) for n in held)
    with_feedback = follow(PatchMaker("int4"), thetas)[-1]
    assert naive > 3 * with_feedback


def test_the_patch_maker_starts_again_when_versions_do_not_follow() -> None:
    thetas = walk(4)
    maker = PatchMaker("int4")
    assert maker.patch(run="r", run_id="id", version=0, created_at=10.0, params=thetas[0]) is None
    maker.published(0, 10.0)
    made = maker.patch(run="r", run_id="id", version=1, created_at=11.0, params=thetas[1])
    assert made is not None and made[0].base_version == 0 and made[0].base_created_at == 10.0
    maker.published(1, 11.0)
    # a republish of version 1 (Redis lost it): no patch, and the next one names the new stamp
    assert maker.patch(run="r", run_id="id", version=1, created_at=12.0, params=thetas[1]) is None
    maker.published(1, 12.0)
    made = maker.patch(run="r", run_id="id", version=2, created_at=13.0, params=thetas[2])
    assert made is not None and made[0].base_created_at == 12.0
    maker.forget()  # version 2's publish failed
    assert maker.patch(run="r", run_id="id", version=3, created_at=14.0, params=thetas[3]) is None
    maker.published(3, 14.0)
    assert all(torch.equal(maker.served[n], thetas[3][n]) for n in SHAPES)  # θ̂ started again from θ
    assert maker.patch(run="r", run_id="id", version=5, created_at=15.0, params=thetas[4]) is None  # a gap


def manifest(**changes: object) -> PatchManifest:
    fields: dict[str, object] = dict(run="r", run_id="id", version=3, base_version=2, base_created_at=1.0,
                                     created_at=2.0, codec="int4", params=(("w", 3072), ("b", 48)),
                                     chunk_bytes=1024, chunk_sha256=("00",) * 2)
    fields.update(changes)
    return PatchManifest(**fields)  # type: ignore[arg-type]


def test_a_patch_manifest_round_trips_and_fits_only_its_own_snapshot() -> None:
    patch = manifest()
    assert PatchManifest.decode(patch.encode()) == patch
    assert patch.total_bytes == 2 * (3072 // 64) + 1536 + 2 * 1 + 24
    target = SnapshotManifest(run="r", run_id="id", version=3,
                              params=(ParamEntry("w", (64, 48), "float32", 0),
                                      ParamEntry("b", (48,), "float32", 3072 * 4)),
                              chunk_bytes=4096, chunk_sha256=("00",) * 4, created_at=2.0)
    assert patch.fits(target)
    assert not manifest(created_at=2.5).fits(target)  # another publish of version 3
    assert not manifest(run_id="other").fits(target)
    assert not manifest(params=(("b", 48), ("w", 3072))).fits(target)  # another layout


def body(**changes: object) -> bytes:
    obj = msgpack.unpackb(manifest().encode())
    obj.update(changes)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("changes, reason", [
    ({"codec": "fp32"}, "unknown_codec"),  # only the bounded block codecs
    ({"codec": "topk"}, "unknown_codec"),
    ({"type": "manifest"}, "wrong_schema"),
    ({"chunk_sha256": ["00"] * 9}, "wrong_schema"),  # does not match the bytes
    ({"params": [["w", True]]}, "wrong_schema"),
    ({"params": [["w", -1]]}, "wrong_schema"),
    ({"params": [["w", 2**41]]}, "wrong_schema"),
    ({"chunk_bytes": 0}, "wrong_schema"),
    ({"protocol": PROTOCOL_VERSION + 1}, "protocol_version"),
])
def test_a_bad_patch_manifest_is_refused_with_a_reason(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        PatchManifest.decode(body(**changes))
    assert caught.value.reason == reason
