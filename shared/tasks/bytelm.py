"""The built-in task: a byte-level causal transformer language model.

Loss is cross-entropy in nats per byte. Sizes: ``tiny`` ≈ 0.5M parameters (a demo trains it on
CPUs in minutes), ``small`` ≈ 5M.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import TaskError
from shared.tasks.corpus import STDLIB, ByteCorpus, random_windows

VOCAB = 256


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    n_layer: int
    n_head: int
    seq_len: int

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise TaskError("d_model must be a multiple of n_head")


MODEL_SIZES = {
    "tiny": ModelShape(d_model=128, n_layer=2, n_head=4, seq_len=128),
    "small": ModelShape(d_model=256, n_layer=6, n_head=8, seq_len=256),
    "medium": ModelShape(d_model=512, n_layer=8, n_head=8, seq_len=256),  # 25M parameters
    "large": ModelShape(d_model=768, n_layer=14, n_head=12, seq_len=256),  # 100M: GPU boxes, scale tests
}


class Block(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        d = shape.d_model
        self.n_head = shape.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteTransformer(nn.Module):
    """GPT-style decoder over bytes; the output head shares the embedding matrix."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok = nn.Embedding(VOCAB, shape.d_model)
        self.pos = nn.Embedding(shape.seq_len, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale residual projections by depth
            assert isinstance(block, Block)
            for proj in (block.proj, block.out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * shape.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T  # (B, T, 256) logits


@dataclass(frozen=True)
class ByteLMSettings:
    """Everything that defines the task; stored in the run's manifest so clients build the same."""

    model_size: str = "tiny"
    data: str = STDLIB
    batch_size: int = 16
    num_shards: int = 16
    eval_sequences: int = 64
    max_corpus_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise TaskError(
                f"unknown model size {self.model_size!r} (known: {', '.join(MODEL_SIZES)})"
            )
        if self.batch_size < 1 or self.num_shards < 1 or self.eval_sequences < 1:
            raise TaskError("batch_size, num_shards and eval_sequences must be >= 1")


class ByteLMTask:
    """Byte-level LM on a text corpus; see :mod:`shared.tasks` for the task protocol."""

    name = "bytelm"

    def __init__(self, settings: ByteLMSettings) -> None:
        self.settings = settings
        self.shape = MODEL_SIZES[settings.model_size]
        self._corpus: ByteCorpus | None = None
        self._eval: torch.Tensor | None = None

    @property
    def corpus(self) -> ByteCorpus:
        if self._corpus is None:  # loaded lazily: the status command never needs it
            self._corpus = ByteCorpus.load(
                self.settings.data,
                num_shards=self.settings.num_shards,
                max_bytes=self.settings.max_corpus_bytes,
            )
        return self._corpus

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)

    @property
    def num_shards(self) -> int:
        return self.settings.num_shards

    @property
    def tokens_per_batch(self) -> int:
        return self.settings.batch_size * self.shape.seq_len

    def build_model(self) -> nn.Module:
        return ByteTransformer(self.shape)

    def train_batches(self, shard: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless (batch_size, seq_len + 1) batches from training shard ``shard``."""
        generator = torch.Generator().manual_seed(seed)
        data = self.corpus.shards[shard % self.settings.num_shards]
        return random_windows(
            data, length=self.shape.seq_len + 1, batch_size=self.settings.batch_size,
            generator=generator,
        )

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats/byte) of a (B, T + 1) batch already on the device."""
        logits = model(batch[:, :-1])  # (B, T, 256)
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def eval_batches(self) -> torch.Tensor:
        if self._eval is None:
            generator = torch.Generator().manual_seed(1234)
            windows = random_windows(
                self.corpus.heldout, length=self.shape.seq_len + 1,
                batch_size=self.settings.eval_sequences, generator=generator,
            )
            self._eval = next(windows)  # (eval_sequences, T + 1), fixed for the whole run
        return self._eval

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> float:
        """Held-out loss in nats per byte on the fixed evaluation set."""
        was_training = model.training
        model.eval()
        batches = self.eval_batches().to(device)
        total = 0.0
        for part in batches.split(32):
            total += float(self.loss(model, part)) * part.shape[0]
        model.train(was_training)
        return total / batches.shape[0]


def make_bytelm(**settings: Any) -> ByteLMTask:
    return ByteLMTask(ByteLMSettings(**settings))
