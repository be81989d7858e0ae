"""Tasks: what is trained (model), on what (data), and how it is judged (eval).

A task is any object with this interface (the built-in one is :class:`shared.tasks.bytelm.ByteLMTask`)::

    name: str
    num_shards: int                        # training data is split into this many shards
    tokens_per_batch: int                  # for throughput figures
    settings_dict() -> dict                # JSON-able settings; rebuilt on clients from the manifest
    build_model() -> torch.nn.Module       # parameters initialised from the current torch seed
    train_batches(shard, seed) -> Iterator # endless batches for one shard, deterministic in seed
    loss(model, batch) -> Tensor           # scalar training loss of a batch already on the device
    evaluate(model, device) -> float       # held-out loss on a fixed set (lower is better)

A user's own task plugs in as ``--task package.module:factory``; ``factory(**settings)`` must
return such an object and be importable on the coordinator and on every client.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from shared.errors import TaskError

BUILTIN = "bytelm"
# A user task's name, "package.module:factory" (use fullmatch: "$" alone lets a trailing newline in).
TASK_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_task(name: str, settings: dict[str, Any]) -> Any:
    """Build the task ``name`` (``"bytelm"`` or ``"package.module:factory"``) from ``settings``."""
    if name == BUILTIN:
        from shared.tasks.bytelm import make_bytelm

        factory: Any = make_bytelm
    elif TASK_IMPORT_PATH.fullmatch(name):
        module_name, attr = name.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise TaskError(f"cannot import task {name!r}: {exc}") from exc
    else:
        raise TaskError(f"unknown task {name!r}: use 'bytelm' or 'package.module:factory'")
    try:
        task = factory(**settings)
    except TypeError as exc:
        raise TaskError(f"task {name!r} rejected its settings: {exc}") from exc
    for attr in ("build_model", "train_batches", "loss", "evaluate", "settings_dict"):
        if not callable(getattr(task, attr, None)):
            raise TaskError(f"task {name!r} has no method {attr}()")
    return task
