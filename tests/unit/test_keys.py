"""Run names and the Redis/AMQP names derived from them."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.keys import RunKeys, validate_run_name


@pytest.mark.parametrize("name", ["default", "exp-1.a", "A_b", "7", "x" * 64])
def test_valid_run_names(name: str) -> None:
    assert validate_run_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a b", "../x", "x" * 65, "-lead", ".hidden", "a:b", "a/b", "abc\n", "é"]
)
def test_invalid_run_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid run name"):
        validate_run_name(name)


def test_run_keys_refuses_bad_names() -> None:
    with pytest.raises(ConfigError):
        RunKeys("a b")


def test_run_keys_layout() -> None:
    keys = RunKeys("exp-1")
    assert keys.manifest(3) == "asyncloco:exp-1:snapshot:3:manifest"
    assert keys.chunk(3, 0) == "asyncloco:exp-1:snapshot:3:chunk:0"
    assert keys.current == "asyncloco:exp-1:current"
    assert keys.plan == "asyncloco:exp-1:plan"
    assert keys.status == "asyncloco:exp-1:status"
    assert keys.coordinator_lease == "asyncloco:exp-1:coordinator"
    assert keys.delta_queue == "asyncloco.exp-1.deltas"
    assert keys.dead_letter_exchange == "asyncloco.exp-1.dlx"
    assert keys.dead_letter_queue == "asyncloco.exp-1.deltas.dead"
    # every Redis key of one run shares the prefix, and no two runs share one
    assert all(k.startswith(keys.prefix) for k in (keys.current, keys.plan, keys.manifest(0)))
    assert not RunKeys("exp-10").current.startswith(keys.prefix)
