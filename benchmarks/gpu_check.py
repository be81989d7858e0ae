"""The device path on a GPU (issue 12): one short script to run whenever a GPU machine is lent.

On ``--device`` (default: cuda) with the bytelm ``--model-size`` (default ``large``, 100M
parameters), it times one client round as ``shared.local_round.LocalTrainer`` runs it, twice:
plain fp32 (``mixed_precision=False``) and the fast path (bf16 autocast, TF32, fused AdamW, pinned
batches). For each it reports

* steps/s over ``--steps`` steps after ``--warmup`` (the median of ``--repeats`` rounds);
* synchronising calls per step inside the loop (``torch.cuda.set_sync_debug_mode``: each call that
  waits for the GPU is counted; progress reports are off, so the target is 0);
* host→device and device→host bytes of a round, counted at the places the client moves data:
  the snapshot loaded into θ_base, the batches, and the delta: the fp32 pseudo-gradient copied to
  the host and encoded there (as before), against ``--codec`` encoded on the device (only its
  bytes cross); the issue's target is device→host ≤ 0.3 × fp32;
* the duty cycle of a round without the network: train time over load + train + encode time.

    python benchmarks/gpu_check.py                          # on the GPU machine: ~2 min on one H200
    python benchmarks/gpu_check.py --device cpu --model-size tiny --steps 4 --warmup 1   # a smoke run

It prints a table and writes a CSV (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from table_csv import write_rows

from shared.codecs import CODECS, get_codec
from shared.error_feedback import ErrorFeedback
from shared.local_round import InnerConfig, LocalTrainer, pick_device
from shared.tasks.bytelm import MODEL_SIZES, make_bytelm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--model-size", default="large", choices=list(MODEL_SIZES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="H: steps of one timed round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocation, kernels)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (median)")
    parser.add_argument("--codec", default="int8", choices=[c for c in CODECS if c != "fp32"])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check/gpu_check.csv"))
    args = parser.parse_args()
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    try:
        device = pick_device(args.device)
    except Exception as exc:  # one clear line, not a traceback
        parser.error(str(exc))
    task = make_bytelm(model_size=args.model_size, batch_size=args.batch_size)
    rows = [_variant(task, device, args, fast) for fast in (False, True)]
    print(f"{args.model_size} bytelm ({rows[0]['params_m']:.1f}M parameters) on {device}, batch "
          f"{args.batch_size}, H = {args.steps}; medians of {args.repeats} rounds")
    columns = ("variant", "bf16", "steps_per_s", "syncs_per_step", "h2d_mb", "d2h_fp32_mb", "d2h_codec_mb",
               "d2h_ratio", "load_s", "train_s", "encode_s", "duty_cycle")
    print(" ".join(f"{c:>14}" for c in columns))
    for row in rows:
        cells = (f"{row[c]:>14.4g}" if isinstance(row[c], float) else f"{row[c]!s:>14}" for c in columns)
        print(" ".join(cells))
    speedup = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    print(f"fast path / fp32 steps/s: {speedup:.2f}x; device→host with {args.codec} on the device: "
          f"{rows[1]['d2h_ratio']:.3f} of fp32 (target ≤ 0.3: "
          f"{'met' if rows[1]['d2h_ratio'] <= 0.3 else 'missed'}); syncs per step "
          f"{rows[1]['syncs_per_step']:.2f} (target 0)")
    write_rows(args.out, rows)
    print(f"wrote {args.out}")


def _variant(task: Any, device: torch.device, args: argparse.Namespace, fast: bool) -> dict[str, Any]:
    trainer = LocalTrainer(task=task, inner=InnerConfig(warmup_steps=0), device=device, shard=0, seed=0,
                           mixed_precision=fast)
    snapshot = {n: p.detach().to("cpu", torch.float32).clone() for n, p in trainer.model.named_parameters()}
    model_bytes = sum(t.numel() * 4 for t in snapshot.values())
    trainer.load_base(snapshot)
    if args.warmup:
        trainer.train(args.warmup)
    loads, trains, encodes, syncs = [], [], [], []
    d2h_codec = 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        trainer.load_base(snapshot)  # what a client does with each new snapshot
        _synchronize(device)
        loads.append(time.perf_counter() - started)
        with _counting_syncs(device) as caught:
            started = time.perf_counter()
            trainer.train(args.steps)  # reading its mean loss at the end waits once: not counted
            trains.append(time.perf_counter() - started)
        syncs.append(max(0, len(caught) - 1) / args.steps)
        started = time.perf_counter()
        feedback = ErrorFeedback(get_codec(args.codec))
        if fast:  # quantised where the delta is: only the codec's bytes leave the device
            blobs = [feedback.encode(n, g) for n, g in trainer.pseudo_gradient(on_device=True).items()]
        else:  # the old path: the fp32 delta copied to the host, encoded there
            blobs = [feedback.encode(n, g) for n, g in trainer.pseudo_gradient().items()]
        _synchronize(device)
        encodes.append(time.perf_counter() - started)
        d2h_codec = sum(len(b) for b in blobs)
    batch_bytes = args.batch_size * (task.shape.seq_len + 1) * 8  # int64 bytes per batch
    load_s, train_s, encode_s = (statistics.median(v) for v in (loads, trains, encodes))
    d2h = d2h_codec if fast else model_bytes
    return {"variant": "fast" if fast else "fp32", "bf16": trainer.autocast_dtype is not None,
            "device": str(device), "params_m": round(model_bytes / 4 / 1e6, 2),
            "steps_per_s": round(args.steps / train_s, 3),
            "syncs_per_step": round(statistics.median(syncs), 3),
            "h2d_mb": round((model_bytes + args.steps * batch_bytes) / 1e6, 2),
            "d2h_fp32_mb": round(model_bytes / 1e6, 2), "d2h_codec_mb": round(d2h / 1e6, 2),
            "d2h_ratio": round(d2h / model_bytes, 4), "load_s": round(load_s, 4),
            "train_s": round(train_s, 4), "encode_s": round(encode_s, 4),
            "duty_cycle": round(train_s / (load_s + train_s + encode_s), 4)}


class _counting_syncs:
    """Collects a warning for each call that waits for the GPU (CUDA only; elsewhere none)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> list[warnings.WarningMessage]:
        if self.cuda:
            self._catcher = warnings.catch_warnings(record=True)
            self.caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self.caught

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(*exc)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
