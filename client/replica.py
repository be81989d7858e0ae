"""This client's replica of the model: the trainer built for a run, and which snapshot θ_base is.

Every round starts from θ_base of the version its delta is tagged with. A new version of the same
run only replaces θ_base; a new run (another run id or run config) gets a fresh trainer: a new
model, new AdamW state and the data shard this client id picks for that run.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Collection
from typing import Any

import torch

from client.fetcher import SnapshotFetcher
from shared.errors import ConfigError, SnapshotError
from shared.local_round import InnerConfig, LocalTrainer
from shared.snapshot import Snapshot
from shared.snapshot_layout import SnapshotManifest
from shared.snapshot_patch import PatchManifest, increments
from shared.tasks import BUILTIN, TASK_IMPORT_PATH, load_task

log = logging.getLogger(__name__)

# What a snapshot's run config must name for a client to build its trainer.
RUN_CONFIG_KEYS = ("task", "task_settings", "inner", "seed")
# Versions in a row that θ_base may reach by patches before a whole snapshot is read again: the
# patches' error does not pile up (shared/snapshot_patch.py), this only bounds what a mistake could.
MAX_PATCHED_VERSIONS = 64


class Replica:
    """The trainer of the current run and the snapshot its θ_base comes from.

    ``data`` (the client's ``--data``) replaces the task's "data" setting when the task has one.
    ``allowed_tasks`` are the tasks besides the built-in one that the volunteer allowed
    (``--allow-task``): a run naming any other task is refused before anything is imported.
    """

    def __init__(self, *, client_id: str, device: torch.device, data: str | None,
                 allowed_tasks: Collection[str] = ()) -> None:
        self.client_id = client_id
        self.device = device
        self.data = data
        self.allowed_tasks = frozenset(allowed_tasks)
        # crc32, not hash(): the same client id must pick the same shard in every process.
        self._crc = zlib.crc32(client_id.encode())
        self.trainer: LocalTrainer | None = None
        self.version: int | None = None  # version θ_base comes from
        self.run_id: str | None = None
        self.progress: dict[str, Any] = {}  # the coordinator's progress in that snapshot
        self._run_key: tuple[str, str] | None = None  # (run_id, config JSON) the trainer was built for
        self._stamp: tuple[str, float] | None = None  # (run_id, created_at) of the base snapshot
        self._patched = 0  # versions reached by patches since θ_base was last read whole

    def holds(self, version: int, read_manifest: Callable[[int], SnapshotManifest]) -> bool:
        """True if θ_base is already snapshot ``version`` of the same run.

        The version number alone is not enough: a coordinator started afresh under the same run
        name publishes its own version 0 again (one small GET of the manifest tells them apart).
        """
        if self.trainer is None or version != self.version:
            return False
        try:
            manifest = read_manifest(version)
        except SnapshotError:
            return False  # expired or replaced: read whatever is current now
        return (manifest.run_id, manifest.created_at) == self._stamp

    def reset(self) -> LocalTrainer:
        """Put the model back to θ_base (every round starts there) and return the trainer."""
        if self.trainer is None:
            raise RuntimeError("no snapshot adopted yet")
        self.trainer.reset_to_base()
        return self.trainer

    def adopt(self, snapshot: Snapshot) -> bool:
        """Make ``snapshot`` θ_base, building a fresh trainer first if it belongs to a new run.

        Returns True if it did (a new run), so the caller can drop what belonged to the old one.
        """
        manifest = snapshot.manifest
        run_config = manifest.config
        for key in RUN_CONFIG_KEYS:
            if key not in run_config:
                raise ConfigError(f"snapshot {manifest.version} has no {key!r} in its run config")
        self.check_task_allowed(run_config["task"])
        run_key = _run_key(manifest)
        new_run = run_key != self._run_key
        if new_run:
            self.trainer = self._build_trainer(run_config)
            self._run_key = run_key
        assert self.trainer is not None
        self.trainer.load_base(snapshot.params)
        self._based_on(manifest)
        self._patched = 0
        return new_run

    def take_newest(self, fetcher: SnapshotFetcher, version: int) -> tuple[int, bool]:
        """Make θ_base ``version``, the newest, which the replica does not hold: by the patches from
        the version held where Redis still has them, else by reading the newest snapshot whole.
        Returns the bytes read, and True if that snapshot began a new run (:meth:`adopt`)."""
        patched = self.catch_up(fetcher, version)
        if patched:
            return patched, False
        snapshot = fetcher.read_latest()
        return snapshot.manifest.total_bytes, self.adopt(snapshot)

    def _based_on(self, manifest: SnapshotManifest) -> None:
        self.version = manifest.version
        self._stamp = (manifest.run_id, manifest.created_at)
        self.run_id = manifest.run_id
        self.progress = dict(manifest.progress)

    def patch_origin(self, target: SnapshotManifest) -> tuple[int, float] | None:
        """(version, created_at) of θ_base, if patches may bring it to ``target``: the same run and
        run config, an older version, and not too many patched versions in a row; else None."""
        if self.trainer is None or self.version is None or self._stamp is None or self._run_key is None:
            return None
        same_run = _run_key(target) == self._run_key
        if not same_run or target.version <= self.version:
            return None
        if self._patched + target.version - self.version > MAX_PATCHED_VERSIONS:
            return None
        return self.version, self._stamp[1]

    def catch_up(self, fetcher: SnapshotFetcher, version: int, *, carry: bool = False) -> int:
        """Bring θ_base to ``version`` with the patches from the version held, when they are in
        Redis (a few bits a parameter, not the fp32 snapshot): the bytes read, or 0 if it could
        not (then read the snapshot whole). ``carry``: mid-round, the model moves with θ_base
        (:meth:`patch_to`)."""
        target = fetcher.manifest_if_readable(version)
        origin = None if target is None else self.patch_origin(target)
        if target is None or origin is None:
            return 0
        patches = fetcher.read_patches(target, held=origin[0], held_created_at=origin[1])
        if patches is None:
            return 0
        try:
            self.patch_to(target, patches, carry=carry)
        except SnapshotError as exc:
            log.warning("%s; reading the snapshot whole", exc)
            return 0
        return sum(m.total_bytes for m, _ in patches)

    def patch_to(self, target: SnapshotManifest, patches: list[tuple[PatchManifest, bytearray]], *,
                 carry: bool = False) -> None:
        """θ_base += each verified patch in turn (the coordinator's θ̂ moved the same way), which
        makes it version ``target``. With ``carry`` (a rebase mid-round: ``--overlap``) the model
        moves by the same amounts, so the round's progress stays; else it is reset to θ_base. A
        patch that does not decode leaves θ_base half patched: then it holds no version (the next
        round reads a whole snapshot) and SnapshotError is raised."""
        trainer = self.trainer
        assert trainer is not None and self.version is not None
        trainer.unstack_base(carry=carry)  # --overlap's own deltas out first: patches are for the snapshot
        try:
            for manifest, buffer in patches:
                for name, increment in increments(manifest, buffer):
                    if name not in trainer.base:
                        raise SnapshotError(f"the patch to {manifest.version} names an unknown parameter")
                    trainer.shift_base(name, increment, carry=carry)
        except SnapshotError:
            self.version = None
            raise
        self._patched += target.version - self.version
        self._based_on(target)
        if not carry:
            trainer.reset_to_base()

    def rebase_onto(self, snapshot: Snapshot) -> bool:
        """Make ``snapshot`` θ_base mid-round, the model's progress carried onto it
        (:meth:`LocalTrainer.rebase`); False (nothing changed) if it belongs to another run."""
        manifest = snapshot.manifest
        if self.trainer is None or _run_key(manifest) != self._run_key:
            return False
        self.trainer.rebase(snapshot.params)
        self._based_on(manifest)
        self._patched = 0
        return True

    def check_task_allowed(self, task: object) -> None:
        """Refuse (ConfigError) a task name that is neither built in nor allowed by the volunteer.

        The name is compared as a string, before :func:`shared.tasks.load_task` could import
        anything: a run may train only code that the volunteer chose to run on this machine.
        """
        if task == BUILTIN or (isinstance(task, str) and task in self.allowed_tasks):
            return
        shown = repr(task)[:100]
        how = (f"; if you trust that code, pass --allow-task {task}" if isinstance(task, str)
               and TASK_IMPORT_PATH.fullmatch(task) else "")
        raise ConfigError(f"the run's task {shown} is not allowed on this client (built in: "
                          f"{BUILTIN!r}; allowed with --allow-task: "
                          f"{', '.join(sorted(self.allowed_tasks)) or 'none'}){how}")

    def describe(self) -> str:
        """Model size, device and data shard, for the "joined run" notice."""
        if self.trainer is None:
            return "no model yet"
        params = sum(p.numel() for p in self.trainer.model.parameters())
        shard = self._crc % self.trainer.task.num_shards
        return f"{params / 1e6:.2f}M params on {self.device}, data shard {shard}"

    def _build_trainer(self, run_config: dict[str, Any]) -> LocalTrainer:
        settings = dict(run_config["task_settings"])
        if self.data is not None:
            if "data" in settings:
                settings["data"] = self.data
            else:
                log.warning("task %r has no 'data' setting; --data is ignored", run_config["task"])
        task = load_task(str(run_config["task"]), settings)
        if not isinstance(run_config["inner"], dict):
            raise ConfigError("the run config's 'inner' is not a map")
        try:
            inner = InnerConfig(**run_config["inner"])
        except TypeError as exc:
            raise ConfigError(f"the run's inner optimizer settings do not fit this client: {exc}") from exc
        return LocalTrainer(
            task=task, inner=inner, device=self.device,
            shard=self._crc % task.num_shards, seed=self._crc ^ int(run_config["seed"]),
        )


def _run_key(manifest: SnapshotManifest) -> tuple[str, str]:
    """What a trainer is built for: the run id and its run config (as canonical JSON)."""
    return manifest.run_id, json.dumps(manifest.config, sort_keys=True, default=str)
