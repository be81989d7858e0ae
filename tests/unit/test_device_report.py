"""The device a client reports with each delta: what it trains on, as a short label the protocol
carries (the operator's ``status`` and dashboard show it, marked as reported)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.local_round import describe_device
from shared.protocol import DEVICE_MAX_CHARS, DeltaMessage
from tests.unit.test_worker_pauses import Script, worker


def test_a_cpu_is_named_with_its_threads() -> None:
    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


def test_mps_is_named_by_its_type() -> None:
    assert describe_device(torch.device("mps")) == "mps"  # naming it needs no Apple GPU


def test_a_gpu_is_named_by_cuda_and_cut_to_what_the_protocol_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert describe_device(torch.device("cuda")) == "cuda: NVIDIA H200"
    # a driver's name is no less foreign than anything else: printable characters, within the limit
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Weird\x1b[31m GPU\n" + "x" * 100)
    label = describe_device(torch.device("cuda"))
    assert label.startswith("cuda: Weird[31m GPU") and len(label) == DEVICE_MAX_CHARS and label.isprintable()


def test_each_delta_a_worker_sends_says_what_it_trained_on(tmp_path: Path) -> None:
    w, _, _, sent, trainer = worker(tmp_path, Script(None), steps=2, max_rounds=2)
    w.run()
    assert len(sent.messages) == 2
    expected = f"cpu ({torch.get_num_threads()} threads)"
    assert trainer.device.type == "cpu" and [m.device for m in sent.messages] == [expected] * 2
    assert DeltaMessage.decode(sent.messages[0].encode()).device == expected  # and it goes over the wire
