"""deploy/compose.yaml and its Dockerfile agree with the code: every setting the coordinator service
gets is one the commands read, only the TLS ports face volunteers, the image pins the Makefile's
torch. (The file's syntax is checked with `docker compose config` where Docker is installed; these
need no Docker.)"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import click

import client.cli as client_cli
import coordinator.cli as cli
from client.politeness import Schedule
from coordinator.volunteer_cli import invite_command
from shared.errors import PERMANENT_ERRORS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = (DEPLOY / "compose.yaml").read_text()


def _envvars(*commands: click.Command) -> set[str]:
    names: set[str] = set()
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.envvar, str):
                names.add(param.envvar)
    return names


def test_every_setting_of_the_coordinator_service_is_read_by_serve_or_invite() -> None:
    service = COMPOSE[COMPOSE.index("\n  coordinator:"):]
    anchor = COMPOSE[COMPOSE.index("x-coordinator-env:"):COMPOSE.index("\nservices:")]
    given = set(re.findall(r"^\s+(ASYNCLOCO_[A-Z_]+):", anchor + service, flags=re.MULTILINE))
    assert {"ASYNCLOCO_REDIS", "ASYNCLOCO_AMQP", "ASYNCLOCO_PUBLIC_REDIS", "ASYNCLOCO_DASHBOARD"} <= given
    read = _envvars(cli.serve, invite_command)
    assert given <= read, given - read


def test_only_the_tls_ports_face_volunteers() -> None:
    published = re.findall(r'^\s+- "((?:[0-9.]+:)?[0-9]+:[0-9]+)"', COMPOSE, flags=re.MULTILINE)
    open_to_all = sorted(p for p in published if not p.startswith("127.0.0.1:"))
    assert open_to_all == ["5671:5671", "6380:6380"]  # AMQP and Redis over TLS
    assert {"127.0.0.1:8080:8080", "127.0.0.1:9100:9100", "127.0.0.1:15672:15672"} <= set(published)


def test_the_image_pins_the_makefiles_cpu_torch_and_lets_a_build_arg_change_it() -> None:
    makefile = (DEPLOY.parent / "Makefile").read_text()
    (torch,) = re.findall(r"^TORCH_SPEC \?= (\S+)$", makefile, flags=re.MULTILINE)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG TORCH_SPEC={torch}\n" in dockerfile
    assert f"TORCH_SPEC: ${{TORCH_SPEC:-{torch}}}" in COMPOSE


def test_the_after_hours_user_unit_agrees_with_the_client() -> None:
    unit = (DEPLOY / "systemd" / "user" / "asyncloco-client.service").read_text()
    timer = (DEPLOY / "systemd" / "user" / "asyncloco-client.timer").read_text()
    assert "Unit=asyncloco-client.service" in timer and "OnCalendar=Mon..Fri 19:00" in timer
    (command,) = re.findall(r"^ExecStart=(.*)$", unit, flags=re.MULTILINE)
    schedule = Schedule.parse(re.findall(r'--schedule "([^"]+)"', command)[0])
    # the timer's starts fall inside the schedule, twelve hours before its windows close
    assert schedule.allows(datetime(2026, 11, 30, 19, 1)) and not schedule.allows(datetime(2026, 12, 1, 7, 1))
    assert schedule.allows(datetime(2026, 12, 5, 7, 1)) and not schedule.allows(datetime(2026, 12, 5, 19, 1))
    assert "RuntimeMaxSec=12h" in unit
    # every option it passes is one the client's join reads
    options = {o for p in client_cli.join.params if isinstance(p, click.Option) for o in p.opts}
    assert set(re.findall(r"(--[a-z-]+)", command)) <= options
    (line,) = re.findall(r"^RestartPreventExitStatus=(.*)$", unit, flags=re.MULTILINE)
    assert {int(c) for c in line.split()} == {2} | {error.exit_code for error in PERMANENT_ERRORS}
