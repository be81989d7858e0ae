"""The clients' journals in a fault test: the deltas the broker confirmed to them."""

from __future__ import annotations

from pathlib import Path

from harness.oracle import read_journal


def confirmed_ids(journals: dict[str, Path]) -> set[str]:
    """Every delta id that some client's journal (client id → path) records as confirmed."""
    return {i for j in journals.values() for i in read_journal(j)}
