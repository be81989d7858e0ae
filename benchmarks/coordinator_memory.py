"""Where a coordinator's memory goes, stage by stage, in units of the model's fp32 bytes (issue 13).

``scale.py --large`` measured a coordinator serving the 100M model at 7.8× the model's fp32 bytes
(peak RSS). This script builds the same coordinator's parts one after the other in this process,
with the code the service runs, and reads VmRSS after each stage, the peak during it (VmHWM,
reset before each stage through ``/proc/self/clear_refs``), and VmRSS again after glibc's
``malloc_trim`` (``live``: what the allocator kept of freed memory handed back, so the rest is held
by live objects):

1. Python, torch and the coordinator's modules imported;
2. ``RunState.open``: the task, its eval model and data, the outer optimizer (θ, momentum and the
   buffer's sum), the guard, the registry;
3. one int8 delta of the model's shapes held as its message bytes (as the consumer hands it over);
4. ``DeltaIntake.handle`` of it, as the body assembled from its parts (decode, checks, guard, the
   outer step), then ``malloc_trim`` as the service does after such a delta (``--no-trim``: not),
   twice more with fresh deltas (what a steady stream leaves behind);
5. ``save_checkpoint`` (streamed to a temp file, fsync, rename);
6. ``Publisher.publish`` of the signed snapshot to Redis (a run of its own, deleted afterwards),
   with the patch from the first snapshot, published before the deltas (θ̂ for the patches);
7. a delta tried on the operator's data (``DescentCheck.strict``, distrust's trial: a copy of the
   evaluation model, three forward passes of one batch, the copy freed after it);
8. the guard's seed round (``RunState.seed_guard``, at a fresh start: a trainer with its model,
   AdamW state and base, ``--seed-steps`` steps of it, freed and trimmed after it).

    .venv/bin/python benchmarks/coordinator_memory.py                   # large (100M): ~2 min, 4 GB
    .venv/bin/python benchmarks/coordinator_memory.py --model-size small
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch
from served import memory_bytes, reset_peak
from table_csv import write_rows

from coordinator.checkpoint import save_checkpoint
from coordinator.config import AuthMode, CoordinatorConfig
from coordinator.descent import DescentCheck
from coordinator.guard import GuardConfig
from coordinator.memory_trim import trim as trim_memory
from coordinator.outcome import OutcomeKind
from coordinator.publisher import Publisher
from coordinator.run_admin import delete_run
from coordinator.run_state import RunState
from harness.processes import AMQP_URL, REDIS_URL, ensure_services, new_run_name
from shared.codecs import get_codec
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.settings import ConnectionSettings
from shared.signing import SigningKey

RESULTS = Path(__file__).resolve().parent / "results" / "coordinator_memory"
MB = 1e6


class Stages:
    """Rows of (stage, RSS after, peak during), each also in units of ``model_bytes``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.model_bytes = 0
        reset_peak()

    def done(self, stage: str) -> None:
        rss, peak = memory_bytes(os.getpid()) or 0, memory_bytes(os.getpid(), "VmHWM") or 0
        gc.collect()
        trim_memory()  # what the allocator kept of freed memory goes back: the rest is live
        live = memory_bytes(os.getpid()) or 0
        previous = self.rows[-1]["live_mb"] * MB if self.rows else 0
        self.rows.append({"stage": stage, "rss_mb": round(rss / MB, 1), "live_mb": round(live / MB, 1),
                          "added_mb": round((live - previous) / MB, 1), "peak_mb": round(peak / MB, 1)})
        print(f"{stage}: RSS {rss / MB:.0f} MB ({live / MB:.0f} live), peak {peak / MB:.0f}", flush=True)
        reset_peak()

    def in_models(self) -> list[dict[str, Any]]:
        per = self.model_bytes / MB
        kinds = ("rss", "live", "added", "peak")
        return [{**row, **{f"{k}_x": round(row[f"{k}_mb"] / per, 2) for k in kinds}} for row in self.rows]


def delta_message(run: RunState, seq: int, round_share: float = 1.0) -> bytes:
    """An honest-sized int8 delta of the model's shapes (a small step: the guard passes it), from a
    client of its own (one delta per client per base), of ``round_share`` of a full round's steps
    (below 1: a DyLU short round, whose compute weight scales it in the step)."""
    codec = get_codec("int8")
    torch.manual_seed(0)  # one direction for all (the guard refuses one against the momentum)
    tensors = {name: codec.encode(torch.randn_like(p) * 1e-4 * (p.abs().mean() + 1e-3))
               for name, p in run.optimizer.params.items()}
    steps = max(1, round(run.config.plan.local_steps * round_share))
    return DeltaMessage(run_id=run.run_id, client_id=f"probe-{seq}", seq=0, base_version=run.version,
                        local_steps=steps, samples=steps, tokens=steps * 256, compute_s=float(steps),
                        train_loss=3.0, codec="int8", tensors=tensors, sent_at=time.time()).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="large", help="bytelm size: tiny, small, medium, large")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-trim", dest="trim", action="store_false",
                        help="leave out the malloc_trim the service calls after a delta in parts")
    parser.add_argument("--round-share", type=float, default=1.0,
                        help="the probes' deltas claim this share of a full round's steps (0.5: a "
                        "DyLU short round, whose compute weight 0.5 scales it in the step)")
    parser.add_argument("--seed-steps", type=int, default=2,
                        help="the seed round's steps here (its memory is reached at the first step; a "
                        "run's seed round runs H of them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stages = Stages()
    stages.done("python, torch and the coordinator imported")
    ensure_services()
    workdir = Path(tempfile.mkdtemp(prefix="asyncloco-coordmem-"))
    name = new_run_name("bench-coordmem")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        servers = ConnectionSettings(redis_url=REDIS_URL, amqp_url=AMQP_URL)
        # made-up deltas: no trial on the operator's data (docs/SCALING.md gives what one costs)
        config = CoordinatorConfig(auth=AuthMode.OPEN, run=name, connection=servers,
                                   task_settings={"model_size": args.model_size},
                                   checkpoint_dir=workdir / "ckpt", guard=GuardConfig(distrust=False))
        run = RunState.open(config, None, None)
        run.start_at(0)
        stages.model_bytes = sum(p.numel() * 4 for p in run.optimizer.params.values())
        stages.done("RunState: task, eval model, outer optimizer, guard")
        publisher = Publisher(client, RunKeys(name), keep_versions=3, signing_key=SigningKey.generate(),
                              patch_codec=config.commit.patch_codec_or_none)
        publisher.publish(run)
        stages.done(f"first snapshot published (θ̂ for the patches: {config.commit.patch_codec})")
        for seq in range(3):
            body = delta_message(run, seq, args.round_share)
            stages.done(f"delta {seq}: its int8 message held ({len(body) / MB:.0f} MB)")
            # past one message's limit a delta comes in parts, and the assembled body is judged
            outcome = run.intake.handle(body, parts_of=(f"probe-{seq}", 0))
            del body
            if args.trim:
                trim_memory()  # as the service does after a delta that came in parts
            if outcome.kind is not OutcomeKind.APPLIED:
                raise RuntimeError(f"the probe's delta was not applied: {outcome}")
            stages.done(f"delta {seq}: judged and applied")
        run.advance_version()
        save_checkpoint(config.checkpoint_dir, run.checkpoint())
        stages.done("checkpoint written")
        publisher.publish(run)
        stages.done(f"snapshot published with its patch ({publisher.patch_bytes / MB:.0f} MB)")
        trial = DescentCheck(run.task, run.eval_model, run.optimizer.params, step_share=lambda: 0.1,
                             tolerance=0.0, device=run.device, keep_model=False)  # as RunState builds it
        torch.manual_seed(1)
        tried = {name: torch.randn_like(p) * 1e-4 for name, p in run.optimizer.params.items()}
        trial.strict(tried)
        del tried, trial
        stages.done("a delta tried on the operator's data (distrust's trial), its model copy freed")
        run.seed_guard(args.seed_steps)  # as serve calls it at a fresh start, memory trimmed after
        stages.done(f"the guard's seed round ({args.seed_steps} steps), its trainer freed")
    finally:
        delete_run(client, ConnectionSettings(amqp_url=AMQP_URL), name, force=True)
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = stages.in_models()
    out = args.out or RESULTS / f"coordinator_memory_{args.model_size}.csv"
    write_rows(out, rows)
    print(f"\nmodel: bytelm {args.model_size}, {stages.model_bytes / MB:.0f} MB of fp32 parameters\n")
    print("| stage | RSS MB | live MB | added MB | peak MB | RSS × model | live × model | peak × model |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['rss_mb']} | {row['live_mb']} | {row['added_mb']} | "
              f"{row['peak_mb']} | {row['rss_x']} | {row['live_x']} | {row['peak_x']} |")
    print(f"CSV: {out}")


if __name__ == "__main__":
    main()
