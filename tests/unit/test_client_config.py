"""The client's settings: --device names."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.config import ClientConfig
from shared.errors import ConfigError

KEY = "ab" * 32


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "mps", "cuda:0", "cuda:12"])
def test_every_device_name_and_one_gpu_of_several_are_taken(device: str, tmp_path: Path) -> None:
    assert ClientConfig(state_dir=tmp_path, coordinator_key=KEY, device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:1:2", "cuda:-1", "CUDA;rm"])
def test_other_device_names_are_refused_with_the_choices(device: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auto, cpu, cuda, mps or cuda:N"):
        ClientConfig(state_dir=tmp_path, coordinator_key=KEY, device=device)
