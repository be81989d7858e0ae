"""``sample``: text from a run's newest committed model, so that people can see what they train.

Read from the run's checkpoint on this machine, as :mod:`coordinator.export` reads it (never from
the servers, so it is safe while the coordinator serves). Only the built-in byte-level LM
(``bytelm``, :mod:`shared.tasks.bytelm`) can be sampled: its model maps bytes to logits over the
next byte. Generation is plain autoregressive decoding over the model's context window (the last
``seq_len`` bytes): greedy at temperature 0, else softmax sampling at that temperature from a
seeded generator, so the same checkpoint, prompt, temperature and seed give the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.checkpoint import load_checkpoint
from coordinator.export import PARAM_PREFIX
from shared.errors import ConfigError
from shared.tasks import BUILTIN, load_task

MAX_SAMPLE_BYTES = 65536  # one command's output; decoding costs a forward pass per byte


@dataclass(frozen=True)
class SampleConfig:
    """What to generate: ``n_bytes`` after ``prompt``; ``temperature`` 0 is greedy."""

    prompt: bytes
    n_bytes: int = 256
    temperature: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ConfigError("--prompt must not be empty: the model continues it")
        if not 1 <= self.n_bytes <= MAX_SAMPLE_BYTES:
            raise ConfigError(f"--bytes must be 1 to {MAX_SAMPLE_BYTES}, not {self.n_bytes}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, not {self.temperature}")


@dataclass(frozen=True)
class Sample:
    """What :func:`sample_run` generated: ``text`` is the prompt followed by the new bytes."""

    version: int
    eval_loss: float | None  # the checkpoint's newest eval, nats per byte
    text: bytes


@dataclass(frozen=True)
class CommittedModel:
    """The run's model with its newest committed θ, in eval mode on the CPU."""

    model: torch.nn.Module
    seq_len: int  # its context window, in bytes
    version: int
    eval_loss: float | None  # the checkpoint's newest eval, nats per byte


def load_model(checkpoint_dir: Path) -> CommittedModel:
    """The built-in LM of the checkpoint in ``checkpoint_dir``; ConfigError (one line) when there is
    no checkpoint or its task is not ``bytelm``."""
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise ConfigError(f"no checkpoint in {checkpoint_dir}: this run has no committed model yet "
                          "(pass the run's --checkpoint-dir, or wait for `serve` to begin it)")
    run_config = checkpoint.state["run_config"]
    if run_config.get("task") != BUILTIN:
        raise ConfigError(f"sample knows only the built-in task {BUILTIN!r}; this run trains "
                          f"{run_config.get('task')!r} (use `export` and the task's own code)")
    task = load_task(BUILTIN, run_config["task_settings"])
    model = task.build_model()
    params = {name[len(PARAM_PREFIX):]: tensor for name, tensor in checkpoint.tensors.items()
              if name.startswith(PARAM_PREFIX)}
    try:
        model.load_state_dict(params, strict=True)
    except RuntimeError as exc:  # names or shapes that are not this task's model
        raise ConfigError(f"the checkpoint in {checkpoint_dir} does not fit its task's model "
                          f"({str(exc).splitlines()[0]})") from exc
    history = checkpoint.state.get("eval_history") or []
    return CommittedModel(model=model.eval(), seq_len=int(task.shape.seq_len), version=checkpoint.version,
                          eval_loss=float(history[-1][2]) if history else None)


@torch.no_grad()
def generate(model: torch.nn.Module, config: SampleConfig, *, seq_len: int) -> bytes:
    """``config.prompt`` followed by ``config.n_bytes`` bytes that ``model`` continues it with,
    each predicted from the last ``seq_len`` bytes (the model's context window)."""
    generator = torch.Generator().manual_seed(config.seed)
    out = bytearray(config.prompt)
    for _ in range(config.n_bytes):
        context = torch.tensor(list(out[-seq_len:]), dtype=torch.long).unsqueeze(0)  # (1, T)
        logits = model(context)[0, -1]  # (256,): the next byte
        if config.temperature == 0:
            byte = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits.float() / config.temperature, dim=-1)
            byte = int(torch.multinomial(probs, 1, generator=generator))
        out.append(byte)
    return bytes(out)


def sample_run(checkpoint_dir: Path, config: SampleConfig) -> Sample:
    """Generate from the newest committed model of the run whose checkpoint is in ``checkpoint_dir``."""
    committed = load_model(checkpoint_dir)
    return Sample(version=committed.version, eval_loss=committed.eval_loss,
                  text=generate(committed.model, config, seq_len=committed.seq_len))


def printable(text: bytes) -> str:
    """``text`` for a terminal: UTF-8 where it decodes, and U+FFFD for undecodable bytes and for
    control characters other than newline and tab (an untrained model emits any byte)."""
    decoded = text.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in decoded)
