"""Fault-injection tests: kill -9 of the coordinator at each crash point, and broker redeliveries.

Marker ``faults`` (with ``e2e``): ``pytest -m faults`` runs just these. They are deterministic and
the whole folder takes about 3 minutes on 2 cores, so they run in the default ``make test``; a test
that would push the folder past ~5 minutes belongs under ``@pytest.mark.slow`` (``make faults``
runs slow ones too).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import run_scope


@pytest.fixture
def run_name() -> Iterator[str]:
    with run_scope("fault") as run:
        yield run
