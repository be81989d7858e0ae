"""--max-memory and --max-gpu-memory: this process's resident memory read from a statm file, the
check between steps that abandons the round (OverMemory, a RoundAbandoned), the caps' limits,
and --max-gpu-memory ignored with one warning off CUDA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from client.memory_caps import (
    GIB,
    MemoryCaps,
    MemoryGuard,
    OverMemory,
    cap_gpu_memory,
    current_rss_bytes,
    over_memory_reason,
    rss_from_statm,
)
from client.stop import RoundAbandoned
from shared.errors import ConfigError


def test_resident_memory_is_statms_second_field_in_pages(tmp_path: Path) -> None:
    assert rss_from_statm("4141 3376 1661 1 0 2019 0\n", 4096) == 3376 * 4096
    statm = tmp_path / "statm"
    statm.write_text("900000 262144 1000 1 0 5000 0\n")
    assert current_rss_bytes(statm) == 262144 * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux only")
def test_this_process_resident_memory_grows_with_what_it_holds() -> None:
    before = current_rss_bytes()
    held = bytearray(256 * 1024**2)  # 256 MiB, touched
    for i in range(0, len(held), 4096):
        held[i] = 1
    after = current_rss_bytes()
    assert before is not None and after is not None and after - before > 200 * 1024**2
    del held


def test_without_statm_the_peak_is_read(tmp_path: Path) -> None:
    peak = current_rss_bytes(tmp_path / "no-proc")  # macOS: no /proc, resource's peak instead
    assert peak is not None and peak > 10 * 1024**2  # a Python with torch loaded


def test_over_the_cap_says_how_much_and_what_to_do() -> None:
    assert over_memory_reason(5 * GIB, 4 * GIB) == (
        "this client uses 5.00 GB of memory, over --max-memory 4 GB (if every round ends so, a smaller "
        "model or batch is the fix: the run's operator sets them; or raise --max-memory)")
    assert over_memory_reason(4 * GIB, 4 * GIB) is None  # at the cap is not over it
    assert over_memory_reason(99 * GIB, 0) is None  # no cap
    assert over_memory_reason(None, 4 * GIB) is None  # unknown


def test_the_guard_abandons_the_round_in_hand_when_over() -> None:
    readings = [3 * GIB, 5 * GIB]
    guard = MemoryGuard(MemoryCaps(max_rss_bytes=4 * GIB), rss_bytes=lambda: readings.pop(0))
    guard.check(steps=1, elapsed_s=0.5)  # under: nothing happens
    with pytest.raises(OverMemory) as caught:
        guard.check(steps=7, elapsed_s=3.5)
    assert isinstance(caught.value, RoundAbandoned)  # the worker's round loop catches it as such
    assert (caught.value.steps, caught.value.elapsed_s) == (7, 3.5)
    assert caught.value.reason.startswith("this client uses 5.00 GB of memory, over --max-memory 4 GB")


def test_without_a_cap_memory_is_not_even_read() -> None:
    def unread() -> int:
        raise AssertionError("read without a cap")

    MemoryGuard(MemoryCaps(), rss_bytes=unread).check(steps=1, elapsed_s=0.1)


def test_a_cap_that_cannot_be_checked_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = MemoryGuard(MemoryCaps(max_rss_bytes=GIB), rss_bytes=lambda: None)  # Windows
    with caplog.at_level(logging.WARNING):
        for steps in range(3):
            guard.check(steps=steps, elapsed_s=0.0)
    assert caplog.text.count("--max-memory is ignored") == 1


@pytest.mark.parametrize("kwargs", [{"max_rss_bytes": -1}, {"max_gpu_fraction": 1.5},
                                    {"max_gpu_fraction": -0.1}, {"max_gpu_fraction": float("nan")}])
def test_bad_caps_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        MemoryCaps(**kwargs)  # type: ignore[arg-type]


def test_a_gpu_cap_off_cuda_is_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert cap_gpu_memory(torch.device("cpu"), 0.0) is False  # no cap asked: silent
        assert caplog.text == ""
        assert cap_gpu_memory(torch.device("cpu"), 0.5) is False
    assert caplog.text.count("\n") == 1
    assert "--max-gpu-memory 0.5 is ignored: it caps CUDA memory, and this client trains on cpu" in (
        caplog.text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_cap_on_cuda_refuses_more_than_its_fraction() -> None:
    assert cap_gpu_memory(torch.device("cuda"), 0.05) is True
    try:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(total * 0.1), dtype=torch.uint8, device="cuda")
        torch.empty(int(total * 0.01), dtype=torch.uint8, device="cuda")  # well under: fine
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
