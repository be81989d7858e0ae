"""End to end, as an operator opens a run to strangers: `serve` (invite-only), `invite` two
volunteers, each joins with nothing but its token file; both train; `revoke` cuts one off for good
while the other goes on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pika
import pika.exceptions
import pytest

from harness.faults import TASK, status
from harness.processes import ROOT, Processes, wait_for
from shared.errors import Revoked
from shared.join_token import JoinToken

pytestmark = pytest.mark.e2e


def _admin(*args: str) -> str:
    """Run an operator command on the coordinator's machine; return what it printed."""
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _updates(run: str) -> dict[str, int]:
    return {c["client_id"]: c["updates"] for c in status(run).get("clients", [])}


def test_invited_volunteers_train_and_a_revoked_one_is_cut_off(
    procs: Processes, run_name: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    admin = ["--run", run_name, "--checkpoint-dir", str(ckpt)]
    for name in ("fast", "slow"):
        printed = _admin("invite", name, *admin, "--token-file", str(tmp_path / f"{name}.token"))
        assert f"invited {name} to run {run_name}" in printed
    assert (tmp_path / "fast.token").stat().st_mode & 0o077 == 0
    procs.start("coordinator", "-m", "coordinator.cli", "serve", *admin, *TASK, "--threads", "1",
                "--local-steps", "6", "--min-local-steps", "2", "--eval-interval", "5",
                "--max-seconds", "150")
    wait_for(lambda: status(run_name).get("eval", {}).get("latest"), 60, "the coordinator's first snapshot")
    clients = {
        name: procs.start(name, "-m", "client.cli", "join", "--token-file", str(tmp_path / f"{name}.token"),
                          "--slowdown", slowdown, "--threads", "1", "--device", "cpu",
                          "--state-dir", str(tmp_path / f"state-{name}"), "--max-seconds", "90",
                          "--log-level", "info")
        for name, slowdown in (("fast", "1"), ("slow", "2"))
    }
    wait_for(lambda: min(_updates(run_name).values(), default=0) >= 2 and len(_updates(run_name)) == 2,
             90, "both volunteers' updates")
    assert status(run_name)["deltas"]["rejected_by_reason"] == {}, procs.logs()

    revoked_at = time.monotonic()
    assert "revoked slow" in _admin("revoke", "slow", *admin)
    time.sleep(2)  # a delta the coordinator took in the moment of the revocation may still count
    slow_after = _updates(run_name)["slow"]
    fast_after = _updates(run_name)["fast"]
    wait_for(lambda: _updates(run_name)["fast"] >= fast_after + 3, 60, "the other volunteer going on")
    assert _updates(run_name)["slow"] == slow_after, "a revoked volunteer's delta was applied"
    assert time.monotonic() - revoked_at < 60
    # The servers closed its connections and refuse its credentials since: the client says so in one
    # line and ends with its own exit code, which its systemd unit does not restart on.
    slow_token = JoinToken.decode((tmp_path / "slow.token").read_text())
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(slow_token.amqp))
    assert clients["slow"].wait(timeout=60) == Revoked.exit_code, procs.log("slow")
    assert "invitation was revoked" in procs.log("slow").strip().splitlines()[-1], procs.log("slow")
    listing = _admin("volunteers", *admin)
    states = [line.split()[:2] for line in listing.splitlines()[1:]]
    assert states == [["fast", "active"], ["slow", "revoked"]]
    _admin("revoke", "fast", *admin)
