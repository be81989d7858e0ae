"""A polite guest end to end: a real client outside its --schedule sends nothing to a real
coordinator, and trains and is applied once its window opens, without a restart. The schedule
reads the owner's local time through the politeness sensors; the test moves that clock."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from client.politeness import Politeness, PolitenessConfig, Schedule, Sensors
from client.worker import Worker
from coordinator.registry import PlanConfig
from harness.processes import wait_for
from tests.integration.test_coordinator_intake import _status
from tests.integration.test_signed_snapshots import client_config
from tests.services import serving, small_config

pytestmark = pytest.mark.integration


def test_a_client_outside_its_schedule_waits_then_trains_when_its_window_opens(
    run_name: str, tmp_path: Path
) -> None:
    opened = threading.Event()  # the owner's clock: 18:59 until the test opens the window at 19:00

    def local_time() -> datetime:
        return datetime(2026, 11, 30, 19, 0, 30) if opened.is_set() else datetime(2026, 11, 30, 18, 59, 0)

    politeness = Politeness(PolitenessConfig(schedule=Schedule.parse("mon-fri 19:00-07:00")),
                            Sensors(local_time=local_time))
    notices: list[tuple[float, str]] = []
    config = small_config(run_name, tmp_path, plan=PlanConfig(local_steps=3, min_local_steps=1))
    with serving(config) as coordinator:
        wait_for(lambda: coordinator.publisher.published_version >= 0, what="the first snapshot")
        settings = client_config(run_name, tmp_path / "client", coordinator.signing_key, client_id="guest",
                                 max_rounds=2, include_wait_s=10.0)
        with Worker(settings, politeness=politeness,
                    on_notice=lambda text: notices.append((time.monotonic(), text))) as worker:
            done: list[object] = []
            runner = threading.Thread(target=lambda: done.append(worker.run()), daemon=True)
            runner.start()
            wait_for(lambda: any("outside --schedule" in text for _, text in notices), 20, "the pause said")
            time.sleep(3)  # paused: nothing trained, nothing sent
            assert _status(run_name).get("deltas", {}).get("applied", 0) == 0
            assert worker.trainer is None or worker.trainer.own_steps == 0
            opened_at = time.monotonic()
            opened.set()
            runner.join(timeout=120)
            assert not runner.is_alive() and done, "the client did not finish its two rounds"
        status = wait_for(lambda: (s := _status(run_name)) and s["deltas"]["applied"] == 2 and s, 30,
                          what="both rounds applied")
    assert [c["client_id"] for c in status["clients"]] == ["guest"]
    pauses = [text for at, text in notices if "outside --schedule" in text]
    assert len(pauses) == 1 and "next window Mon 19:00" in pauses[0]  # said once, with when it ends
    assert any(at >= opened_at and "resum" in text.lower() for at, text in notices), notices
