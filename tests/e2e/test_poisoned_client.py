"""End to end with real processes: one volunteer of three lies (its delta is the honest one times
−10, harness/attacker.py), through the real broker and intake; the guard refuses its deltas and
the run trains as well as the same honest clients without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from harness.faults import run_key
from harness.processes import REDIS_URL, Processes, wait_for
from shared.keys import RunKeys
from tests.services import run_scope

pytestmark = pytest.mark.e2e

TASK = ["--model-size", "tiny", "--batch-size", "8", "--task-setting", "max_corpus_bytes=2000000",
        "--task-setting", "eval_sequences=32"]
ROUNDS = 8  # each honest client's rounds
H = 10


def _status(run: str) -> dict:
    raw = redis.Redis.from_url(REDIS_URL).get(RunKeys(run).status)
    return json.loads(raw) if raw else {}


def _train(procs: Processes, run: str, workdir: Path, *, liar: bool) -> dict:
    """Two honest clients (one of them the trusted warm-start holder, as an open run should
    start) for ROUNDS rounds each, and with ``liar`` a third that sends −10× its honest delta;
    the final status once the coordinator stopped."""
    key_file, coordinator_key = run_key(workdir)
    procs.start(f"coordinator-{run}", "-m", "coordinator.cli", "serve", "--run", run, *TASK, "--threads", "1",
                "--signing-key", str(key_file), "--checkpoint-dir", str(workdir / "ckpt"),
                "--local-steps", str(H), "--min-local-steps", "2", "--warm-start-steps", str(3 * H),
                "--warm-start-client", "honest-1", "--eval-interval", "2", "--max-seconds", "240",
                "--auth", "open", "--seed", "3")
    wait_for(lambda: _status(run).get("eval", {}).get("latest"), 60, "the coordinator's first snapshot")
    common = ["--run", run, "--threads", "1", "--device", "cpu", "--state-dir", str(workdir / "state"),
              "--coordinator-key", coordinator_key]
    honest = [procs.start(f"{cid}-{run}", "-m", "client.cli", "join", "--client-id", cid,
                          "--max-rounds", str(ROUNDS), *common) for cid in ("honest-1", "honest-2")]
    if liar:
        procs.start(f"liar-{run}", "-m", "harness.attacker", "--signflip", "10", "--", "join",
                    "--client-id", "liar", "--max-seconds", "150", *common)
    wait_for(lambda: all(p.poll() is not None for p in honest), 180, "the honest clients' rounds")
    assert [p.returncode for p in honest] == [0, 0], procs.log(f"honest-1-{run}")
    procs.stop_all()  # SIGTERM: the coordinator commits and evaluates the final model
    final = _status(run)
    assert final["coordinator"]["state"] == "stopped"
    return final


def test_a_sign_flipping_volunteer_does_no_harm(procs: Processes, tmp_path: Path) -> None:
    with run_scope() as run:
        clean = _train(procs, run, tmp_path / "clean", liar=False)
    with run_scope() as run:
        attacked = _train(procs, run, tmp_path / "attacked", liar=True)

    start = clean["eval"]["history"][0]["loss"]
    clean_loss = clean["eval"]["latest"]
    attacked_loss = attacked["eval"]["latest"]
    assert clean_loss < start - 1.0, (start, clean_loss)  # the clean run trained
    # every delta of the liar refused by the guard (a client with nothing applied is not listed)
    assert all(c["updates"] == 0 for c in attacked["clients"] if c["client_id"] == "liar")
    # refused for their size or direction: by the guard, or by the intake's absolute bound (|g| at
    # most |θ|), which −10x a delta early in a run can pass
    refused = attacked["deltas"]["rejected_by_reason"]
    liar_reasons = ("norm_too_large", "norm_outlier", "tensor_outlier", "against_momentum")
    assert sum(refused.get(r, 0) for r in liar_reasons) >= 3, refused
    assert sum(refused.get(r, 0) for r in liar_reasons[1:]) >= 1, refused  # the guard did its part
    assert attacked["deltas"]["guard"]["judged"] > 0
    # within 5% of the clean run's loss
    assert attacked_loss <= 1.05 * clean_loss, (clean_loss, attacked_loss)
