"""A real coordinator served for a benchmark, and what the benchmark reads of it.

Shared by ``intake.py --broker`` and ``scale.py``: the coordinator's command line at any bytelm
size (``serve --model-size`` offers tiny and small; medium and large go in as a task setting),
its first snapshot or manifest, its ``/metrics``, and a process's CPU seconds and memory from ``/proc``;
and deltas its guard takes as honest ones (:func:`honest_payloads`).
"""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import torch

from harness.faults import coordinator_args
from shared.codecs import get_codec
from shared.errors import SnapshotError
from shared.snapshot import Snapshot, SnapshotStore
from shared.snapshot_layout import SnapshotManifest

DIRECTION_SEED = 7  # the direction honest deltas share (scale_clients.py's too)
NOISE = 0.5  # each delta's own noise, relative to the shared direction (as tests/integration do)
SERVE_SIZES = ("tiny", "small")  # what `serve --model-size` takes; the other sizes are task settings


def serve_args(run: str, checkpoint_dir: Path, model_size: str, *extra: str) -> list[str]:
    """``python`` arguments of the harness's coordinator (one thread, ``--auth open``) serving the
    bytelm model of ``model_size`` (any of ``shared.tasks.bytelm.MODEL_SIZES``)."""
    # its senders' deltas are made up: distrust's trial on the operator's data would refuse a run's
    # first ones, the seed round would judge them against a real round's delta (and both cost forward
    # passes the intake's figures are not about)
    args = coordinator_args(run, checkpoint_dir, "--no-guard-distrust", "--no-guard-seed-round", *extra)
    at = args.index("--model-size")  # the harness's tiny task
    if model_size in SERVE_SIZES:
        args[at + 1] = model_size
    else:
        args[at:at + 2] = ["--task-setting", f"model_size={model_size}"]
    return args


def first_snapshot(store: SnapshotStore) -> Snapshot | None:
    """The current snapshot, or None while there is none (a :func:`harness.processes.wait_for` probe)."""
    try:
        return store.read()
    except SnapshotError:
        return None


def first_manifest(store: SnapshotStore) -> SnapshotManifest | None:
    """The current version's manifest (names, shapes, run id: a small read, whatever the model's
    size), or None while there is none (a :func:`harness.processes.wait_for` probe)."""
    try:
        version = store.current_version()
        return None if version is None else store.read_manifest(version)
    except SnapshotError:
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for ``--metrics-port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The coordinator's ``/metrics`` on ``port``: sample (with its labels, as written) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines
                                                   if line and not line.startswith("#"))}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()  # after the command name: utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """``field`` of ``/proc/PID/status`` in bytes (VmRSS: now; VmHWM: the peak), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak() -> None:
    """Set this process's VmHWM back to its current VmRSS (Linux 4.0+), so that the next
    ``memory_bytes(os.getpid(), "VmHWM")`` is the peak of what came after."""
    Path("/proc/self/clear_refs").write_text("5")


def honest_tensor(index: int, shape: torch.Size | int, *, own_seed: int, scale: float) -> torch.Tensor:
    """Tensor ``index`` of a delta the coordinator's guard takes as it takes honest ones: the
    direction every such delta shares (:data:`DIRECTION_SEED`) plus noise of its own
    (``own_seed``), :data:`NOISE` times as big, all × ``scale`` per element."""
    shared = torch.Generator().manual_seed(DIRECTION_SEED * 1_000_003 + index)
    own = torch.Generator().manual_seed(own_seed * 1_000_003 + index)
    g = torch.randn(shape, generator=shared).add_(torch.randn(shape, generator=own), alpha=NOISE)
    return g.mul_(scale)


def honest_payloads(shapes: dict[str, torch.Size], codec: str, *, scale: float,
                    variants: int = 2) -> list[dict[str, bytes]]:
    """``variants`` encoded deltas of ``shapes`` made of :func:`honest_tensor`, one tensor at a
    time. Deltas of opposite signs, alternated, would keep θ from drifting, but the guard's
    direction check refuses the second of each pair."""
    encoder = get_codec(codec)
    return [{name: encoder.encode(honest_tensor(i, shape, own_seed=(variant + 1) * 7_919, scale=scale))
             for i, (name, shape) in enumerate(shapes.items())} for variant in range(variants)]
