"""The local training round, exactly as clients (and the simulator) run it.

A round starts from the global parameters θ_base of some snapshot version, runs H inner AdamW steps
on this client's data shard, and yields the pseudo-gradient ``g = θ_base − θ_local``. The AdamW state
is kept across rounds (as in DiLoCo). The inner learning rate warms up over this client's own first
steps (a fresh AdamW needs it) and follows a cosine over the run's global progress.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from shared.errors import ConfigError
from shared.protocol import device_label


@dataclass(frozen=True)
class InnerConfig:
    """Inner optimizer settings; part of the run config in the manifest."""

    lr: float = 3e-3
    warmup_steps: int = 50
    # Cosine horizon in global local steps (all clients together); 0 keeps lr flat after warmup.
    schedule_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 < self.min_lr_ratio <= 1):
            raise ConfigError("inner lr must be > 0 and 0 < min_lr_ratio <= 1 (η_min > 0)")
        if self.warmup_steps < 0 or self.schedule_steps < 0:
            raise ConfigError("warmup_steps and schedule_steps must be >= 0")

    def lr_at(self, own_step: int, global_step: int) -> float:
        """Inner lr for this client's ``own_step``-th step, the run being at ``global_step``."""
        warm = min(1.0, (own_step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if not self.schedule_steps:
            return self.lr * warm
        progress = min(1.0, global_step / self.schedule_steps)
        cosine = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * warm * cosine


@dataclass(frozen=True)
class StepProgress:
    """Where a round stands, handed to ``LocalTrainer.train``'s ``on_step`` now and then."""

    steps: int  # inner steps done so far in this round
    max_steps: int  # the most it will run (fewer if the time budget or a stop ends it)
    tokens: int
    elapsed_s: float  # wall time since the round began, emulated slowdown included
    loss: float  # the last step's training loss


@dataclass(frozen=True)
class RoundStats:
    steps: int
    samples: int
    tokens: int
    compute_s: float  # wall time of the steps, emulated slowdown included
    train_loss: float  # mean over the round's steps
    paused_s: float = 0.0  # time in ``between_steps`` (not in compute_s): a rebase's fetch


class LocalTrainer:
    """Owns one replica: model on the device, its AdamW, its data stream and θ_base (fp32, on the
    device too, so the pseudo-gradient is taken there).

    On CUDA the round runs the fast path unless ``mixed_precision`` is off: bf16 autocast where the
    GPU supports it (parameters, AdamW state and θ_base stay fp32), TF32 matmuls, the fused AdamW,
    batches staged through pinned host memory. No step waits for the device except to report
    progress (at most every ``progress_every_s``) and to emulate ``slowdown``.
    """

    def __init__(
        self,
        *,
        task: Any,
        inner: InnerConfig,
        device: torch.device,
        shard: int,
        seed: int,
        mixed_precision: bool = True,
    ) -> None:
        self.task = task
        self.inner = inner
        self.device = device
        cuda = device.type == "cuda"
        if cuda and mixed_precision:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # bf16 autocast on a GPU that has it; None: plain fp32
        self.autocast_dtype = (torch.bfloat16 if cuda and mixed_precision and torch.cuda.is_bf16_supported()
                               else None)
        self.model = task.build_model().to(device)
        self.model.train()
        self.params = dict(self.model.named_parameters())
        self.names = list(self.params)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=inner.lr,
            betas=(inner.beta1, inner.beta2),
            weight_decay=inner.weight_decay,
            fused=True if cuda else None,  # one kernel for all parameters (CUDA only)
        )
        self.batches: Iterator[Any] = task.train_batches(shard, seed)
        self.base: dict[str, torch.Tensor] = {}
        # (delta, share) stacked on the base since it was loaded (stack_on_base)
        self.stacked: list[tuple[dict[str, torch.Tensor], float]] = []
        self.own_steps = 0  # inner steps this replica ever ran (drives the warmup)

    def load_base(self, params: dict[str, torch.Tensor]) -> None:
        """Set θ_base and the model's parameters to ``params`` (float32 tensors, any device)."""
        missing = set(self.names) - set(params)
        if missing:
            raise ConfigError(f"snapshot lacks parameters: {sorted(missing)[:5]}")
        self.base = {n: params[n].detach().to(self.device, torch.float32, copy=True) for n in self.names}
        self.stacked = []
        self.reset_to_base()

    def stack_on_base(self, delta: dict[str, torch.Tensor], share: float) -> None:
        """θ_base −= share · delta (``--overlap``: the client's own in-flight delta, as the
        coordinator will move θ at its arrival), remembered so that :meth:`unstack_base` can put
        the base back where its snapshot had it."""
        for name in self.base:
            self.shift_base(name, delta[name], alpha=-share)
        self.stacked.append((delta, share))

    def unstack_base(self, *, carry: bool = False) -> None:
        """Undo every :meth:`stack_on_base` since the base was loaded (up to float rounding);
        ``carry``: move the model's parameters with it (mid-round: the progress stays)."""
        for delta, share in reversed(self.stacked):
            for name, increment in delta.items():
                self.shift_base(name, increment, alpha=share, carry=carry)
        self.stacked = []

    def shift_base(self, name: str, increment: torch.Tensor, *, alpha: float = 1.0,
                   carry: bool = False) -> None:
        """θ_base[name] += alpha · increment; ``carry``: the parameter too (its progress stays)."""
        with torch.no_grad():
            base = self.base[name]
            moved = increment.to(base.device).view_as(base)
            base.add_(moved, alpha=alpha)
            if carry:
                param = self.params[name]
                param.add_(moved.view_as(param), alpha=alpha)

    def rebase(self, params: dict[str, torch.Tensor]) -> None:
        """Carry the round's progress so far onto a newer base: θ_local += params − θ_base, then
        θ_base = params (``--overlap``: the snapshot that holds the client's last delta arrived
        mid-round). The inner optimizer's state carries on; the pseudo-gradient is then taken
        against the new base and holds the whole round's work."""
        with torch.no_grad():
            for name, param in self.params.items():
                new = params[name].detach().to(self.device, torch.float32, copy=True).view_as(self.base[name])
                param.add_((new - self.base[name]).view_as(param))
                self.base[name] = new
        self.stacked = []

    def reset_to_base(self) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(self.base[name].view_as(param))

    def train(
        self,
        max_steps: int,
        *,
        global_step: int = 0,
        min_steps: int = 1,
        time_budget_s: float | None = None,
        slowdown: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[StepProgress], None] | None = None,
        progress_every_s: float = 0.5,
        between_steps: Callable[[], None] | None = None,
    ) -> RoundStats:
        """Run up to ``max_steps`` inner steps from the current parameters.

        Stops early once ``time_budget_s`` is spent (after at least ``min_steps``), or when
        ``should_stop()`` turns true. ``slowdown`` > 1 emulates slower hardware by sleeping
        ``(slowdown − 1)×`` the compute time of each step. ``on_step`` gets a :class:`StepProgress`
        after the first step, then at most every ``progress_every_s`` seconds, and after the last
        (reading the loss waits for the device, so not every step); an exception it raises ends
        the round and propagates, the parameters left mid-round (the caller resets them).
        ``between_steps`` runs after every step but the last (a rebase, ``--overlap``); its time
        is the round's ``paused_s``, not its compute time.
        """
        losses: list[torch.Tensor] = []
        samples = tokens = 0
        start = time.perf_counter()
        reported_at: float | None = None  # when on_step was last called
        reported_steps = 0  # and at how many steps
        paused = 0.0

        def report() -> None:
            nonlocal reported_at, reported_steps
            assert on_step is not None
            reported_at, reported_steps = time.perf_counter(), len(losses)
            on_step(StepProgress(steps=len(losses), max_steps=max_steps, tokens=tokens,
                                 elapsed_s=reported_at - start, loss=float(losses[-1])))

        for step in range(max_steps):
            if should_stop is not None and should_stop():
                break
            if step >= min_steps and time_budget_s is not None:
                if time.perf_counter() - start >= time_budget_s:
                    break
            step_start = time.perf_counter()
            lr = self.inner.lr_at(self.own_steps, global_step + step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = to_device(next(self.batches), self.device)
            with self._precision():
                loss = self.task.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.inner.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.inner.grad_clip)
            self.optimizer.step()
            losses.append(loss.detach())
            self.own_steps += 1
            samples += _batch_size(batch)
            tokens += _batch_tokens(batch)
            if slowdown > 1.0:
                _synchronize(self.device)
                time.sleep((slowdown - 1.0) * (time.perf_counter() - step_start))
            if on_step is not None and (
                reported_at is None or time.perf_counter() - reported_at >= progress_every_s
            ):
                report()
            if between_steps is not None and step + 1 < max_steps:
                pausing = time.perf_counter()
                between_steps()
                paused += time.perf_counter() - pausing
        if on_step is not None and reported_steps < len(losses):
            report()  # the last step, unless it was just reported
        _synchronize(self.device)
        compute_s = time.perf_counter() - start - paused
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        return RoundStats(len(losses), samples, tokens, compute_s, mean_loss, paused)

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def pseudo_gradient(self, *, on_device: bool = False) -> dict[str, torch.Tensor]:
        """``θ_base − θ_local`` per parameter, float32: taken on the device, and copied to the CPU
        unless ``on_device`` (a codec then quantises it there: only its bytes cross to the host)."""
        with torch.no_grad():
            gradient = {name: self.base[name] - param.detach().float()
                        for name, param in self.model.named_parameters()}
        return gradient if on_device else {name: g.to("cpu") for name, g in gradient.items()}


def to_device(batch: Any, device: torch.device) -> Any:
    """A task's batch (a tensor, or a tuple or list of them) moved to ``device``; to a GPU through
    pinned host memory, so the copy runs without holding up the host."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def _batch_size(batch: Any) -> int:
    return int(_first_tensor(batch).shape[0])


def _batch_tokens(batch: Any) -> int:
    return int(_first_tensor(batch).numel())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def pick_device(choice: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; ``cuda:N`` one GPU of several; other
    values are taken as given."""
    if choice.startswith("cuda:"):
        index = choice[len("cuda:"):]
        if not index.isdigit():
            raise ConfigError(f"--device cuda:N takes a GPU number, not {choice!r}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index) >= count:
            raise ConfigError(f"--device {choice} asked for, but torch sees {count} CUDA GPU(s)"
                              + (f": cuda:0 to cuda:{count - 1}" if count else ""))
        return torch.device("cuda", int(index))
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA GPU")
    if choice == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError("--device mps asked for, but this torch build has no MPS backend")
    if choice not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {choice!r}")
    return torch.device(choice)


def describe_device(device: torch.device) -> str:
    """What a delta says it was trained on, for the operator's ``status`` and dashboard: "cpu (8
    threads)", "cuda: NVIDIA H200", "mps"; cut to what the protocol carries (:func:`device_label`)."""
    if device.type == "cpu":
        return device_label(f"cpu ({torch.get_num_threads()} threads)")
    if device.type == "cuda":
        return device_label(f"cuda: {torch.cuda.get_device_name(device)}")
    return device_label(device.type)
