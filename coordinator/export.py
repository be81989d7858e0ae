"""``export``: the current model of a run, as files anyone can load without asyncloco's servers.

Read from the run's checkpoint on this machine (never from Redis: nothing from the network is
decoded here), written to a directory as

* ``model.safetensors``: θ, the model's parameters under their own names (``model.named_parameters()``
  of the task), float32, with the run, its id and the version in the safetensors metadata;
* ``config.json``: the run config clients build the model from (``task``, ``task_settings``,
  ``inner``, ``seed``), with ``run``, ``run_id``, ``version`` and the newest eval.

So ``load_task(cfg["task"], cfg["task_settings"]).build_model().load_state_dict(load_file(...))``
gives the model back. Each file is written whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save

from coordinator.checkpoint import load_checkpoint
from shared.errors import ConfigError
from shared.files import write_atomically

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PARAM_PREFIX = "param/"  # θ's tensors in the checkpoint (the outer optimizer's tensors())
FORMAT = 1


@dataclass(frozen=True)
class Exported:
    """What :func:`export_model` wrote."""

    version: int
    parameters: int  # scalars in θ
    model: Path
    config: Path


def export_model(checkpoint_dir: Path, out_dir: Path) -> Exported:
    """Write the model of the checkpoint in ``checkpoint_dir`` to ``out_dir`` (created if missing;
    files of an earlier export there are replaced). ConfigError if there is no checkpoint."""
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise ConfigError(f"no checkpoint in {checkpoint_dir}: nothing to export (pass the run's "
                          "--checkpoint-dir)")
    params = {name[len(PARAM_PREFIX):]: tensor.contiguous()
              for name, tensor in checkpoint.tensors.items() if name.startswith(PARAM_PREFIX)}
    if not params:
        raise ConfigError(f"the checkpoint in {checkpoint_dir} holds no model parameters")
    state = checkpoint.state
    history = state.get("eval_history") or []
    config: dict[str, Any] = {
        "format": FORMAT,
        "run": state.get("run"),
        "run_id": state["run_id"],
        "version": checkpoint.version,
        **state["run_config"],
        "eval": {"version": history[-1][0], "loss": history[-1][2]} if history else None,
    }
    metadata = {"run": str(state.get("run")), "run_id": str(state["run_id"]),
                "version": str(checkpoint.version), "task": str(config.get("task"))}
    model_path, config_path = out_dir / MODEL_FILE, out_dir / CONFIG_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(model_path, save(params, metadata=metadata))
        write_atomically(config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {out_dir} ({exc.strerror or exc})") from exc
    return Exported(version=checkpoint.version, parameters=sum(t.numel() for t in params.values()),
                    model=model_path, config=config_path)
