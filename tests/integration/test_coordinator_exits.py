"""``asyncloco-coordinator serve`` against the real servers: a wrong broker password ends it at once
in one line with its own exit code (77), as systemd's ``RestartPreventExitStatus=`` expects, rather
than retrying for ever. The other codes are tested without servers in tests/unit/test_serve_exits.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from harness.processes import AMQP_URL, REDIS_URL, ROOT
from shared.errors import AccessRefused

pytestmark = pytest.mark.integration


def test_a_wrong_broker_password_ends_serve_in_one_line_with_its_exit_code(
    tmp_path: Path, run_name: str
) -> None:
    parsed = urlparse(AMQP_URL)
    port = parsed.port or 5672
    wrong = parsed._replace(netloc=f"{parsed.username}:wrong-{os.getpid()}@{parsed.hostname}:{port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCLOCO_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--run", run_name, "--auth", "open",
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--threads", "1", "--log-level", "warning",
         "--redis", REDIS_URL, "--amqp", wrong.geturl()],
        cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=120)
    assert done.returncode == AccessRefused.exit_code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # that line alone: no traceback, no retry chatter
    assert lines[0].startswith(f"error: RabbitMQ at {parsed.hostname}:{port} refused user "
                               f"'{parsed.username}' ("), lines[0]
    assert lines[0].endswith("check the user and password in --amqp"), lines[0]
    assert f"wrong-{os.getpid()}" not in done.stderr  # the password is never shown
    assert time.monotonic() - started < 90  # refused, not retried
