"""The run's progress: local steps, tokens and samples of every applied delta, over the whole run.

Published in each snapshot's manifest (clients schedule their inner learning rate on
``local_steps``), shown by ``status``, saved in the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RunProgress:
    local_steps: int = 0
    tokens: int = 0
    samples: int = 0

    def add(self, *, local_steps: int, tokens: int, samples: int) -> None:
        self.local_steps += local_steps
        self.tokens += tokens
        self.samples += samples

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def save_state(self) -> dict[str, Any]:
        return {"progress": self.as_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        data = state.get("progress") or {}
        self.local_steps = int(data.get("local_steps", 0))
        self.tokens = int(data.get("tokens", 0))
        self.samples = int(data.get("samples", 0))
