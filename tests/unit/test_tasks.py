"""Tasks: the byte corpus, the built-in byte-level LM, and loading tasks by name."""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from shared.errors import TaskError
from shared.tasks import load_task
from shared.tasks.corpus import BLOCK_BYTES, HOLDOUT_EVERY, ByteCorpus

CORPUS_BYTES = 25 * BLOCK_BYTES + 12_345  # 26 blocks: one regular held-out block (index 19)


def _write_corpus(root: Path, total_bytes: int, files: int = 12) -> None:
    """Text files whose every line is unique, so any 64 KiB block occurs only once."""
    root.mkdir(parents=True, exist_ok=True)
    per_file = total_bytes // files + 1
    for f in range(files):
        lines = []
        size = 0
        j = 0
        while size < per_file:
            line = f"file {f:03d} line {j:06d}: the quick brown fox jumps over the lazy dog\n"
            lines.append(line)
            size += len(line)
            j += 1
        (root / f"part_{f:03d}.txt").write_text("".join(lines))
    (root / "ignored.bin").write_bytes(b"\xff" * 1000)  # not matched by the glob


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(root / "nested", CORPUS_BYTES)
    return str(root / "**" / "*.txt")


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


# --- ByteCorpus ----------------------------------------------------------------------------------


def test_corpus_shards_and_heldout_partition_the_text(corpus_glob: str) -> None:
    corpus = ByteCorpus.load(corpus_glob, num_shards=5, max_bytes=10**9)
    assert len(corpus.shards) == 5
    total = sum(Path(p).stat().st_size + 2 for p in glob.glob(corpus_glob, recursive=True))
    # every byte is either held out or in exactly one shard
    assert corpus.heldout.numel() + sum(s.numel() for s in corpus.shards) == total
    assert corpus.heldout.numel() == BLOCK_BYTES  # block 19 of 26
    heldout = _bytes(corpus.heldout)
    for shard in corpus.shards:
        assert heldout not in _bytes(shard)
        assert heldout[:200] not in _bytes(shard)
    assert corpus.heldout.dtype == torch.uint8


def test_corpus_shards_are_disjoint(corpus_glob: str) -> None:
    corpus = ByteCorpus.load(corpus_glob, num_shards=3, max_bytes=10**9)
    first = _bytes(corpus.shards[0])
    probe = first[BLOCK_BYTES : BLOCK_BYTES + 500]  # from the shard's second block
    assert all(probe not in _bytes(s) for s in corpus.shards[1:])


def test_corpus_is_deterministic(corpus_glob: str) -> None:
    a = ByteCorpus.load(corpus_glob, num_shards=4, max_bytes=10**9)
    b = ByteCorpus.load(corpus_glob, num_shards=4, max_bytes=10**9)
    assert torch.equal(a.heldout, b.heldout)
    assert all(torch.equal(x, y) for x, y in zip(a.shards, b.shards, strict=True))


def test_corpus_respects_max_bytes(corpus_glob: str) -> None:
    limit = 3 * BLOCK_BYTES
    corpus = ByteCorpus.load(corpus_glob, num_shards=2, max_bytes=limit)
    assert corpus.heldout.numel() + sum(s.numel() for s in corpus.shards) == limit
    # fewer than HOLDOUT_EVERY blocks: the last block is held out instead
    assert 3 < HOLDOUT_EVERY
    assert corpus.heldout.numel() == BLOCK_BYTES
    assert _bytes(corpus.heldout) not in b"".join(_bytes(s) for s in corpus.shards)


def test_corpus_too_small(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n" * 100)
    with pytest.raises(TaskError, match="128 KiB"):
        ByteCorpus.load(str(tmp_path / "*.txt"), num_shards=2, max_bytes=10**9)


def test_corpus_no_files(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no files"):
        ByteCorpus.load(str(tmp_path / "*.txt"), num_shards=2, max_bytes=10**9)


# --- ByteLMTask ----------------------------------------------------------------------------------


def bytelm(corpus_glob: str, **settings: Any) -> Any:
    base = {
        "data": corpus_glob,
        "max_corpus_bytes": 8 * BLOCK_BYTES,
        "num_shards": 4,
        "batch_size": 4,
        "eval_sequences": 8,
    }
    return load_task("bytelm", {**base, **settings})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("size", "low", "high"), [("tiny", 0.35e6, 0.7e6), ("small", 3.5e6, 7e6)])
def test_model_sizes(corpus_glob: str, size: str, low: float, high: float) -> None:
    task = bytelm(corpus_glob, model_size=size)
    assert low <= n_params(task.build_model()) <= high


def test_unknown_model_size(corpus_glob: str) -> None:
    with pytest.raises(TaskError, match="model size"):
        bytelm(corpus_glob, model_size="huge")


def test_unknown_setting_is_a_task_error(corpus_glob: str) -> None:
    with pytest.raises(TaskError, match="rejected its settings"):
        bytelm(corpus_glob, layers=12)


def test_settings_dict_rebuilds_the_same_task(corpus_glob: str) -> None:
    task = bytelm(corpus_glob)
    again = load_task("bytelm", task.settings_dict())
    assert again.settings == task.settings
    assert again.tokens_per_batch == 4 * 128
    assert again.num_shards == 4


def test_train_batches(corpus_glob: str) -> None:
    task = bytelm(corpus_glob)
    a = task.train_batches(1, seed=7)
    b = task.train_batches(1, seed=7)
    first = next(a)
    assert first.shape == (4, 129) and first.dtype == torch.int64
    assert int(first.min()) >= 0 and int(first.max()) < 256
    assert torch.equal(first, next(b))
    assert torch.equal(next(a), next(b))
    assert not torch.equal(next(a), first)  # the stream moves on
    assert not torch.equal(next(task.train_batches(2, seed=7)), first)
    assert not torch.equal(next(task.train_batches(1, seed=8)), first)
    # shard numbers wrap around num_shards
    assert torch.equal(next(task.train_batches(5, seed=7)), first)


def test_loss_at_init_is_near_uniform(corpus_glob: str) -> None:
    task = bytelm(corpus_glob)
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        loss = float(task.loss(model, next(task.train_batches(0, seed=0))))
    assert abs(loss - math.log(256)) < 0.3


def test_evaluate_is_deterministic(corpus_glob: str) -> None:
    task = bytelm(corpus_glob)
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    first = task.evaluate(model)
    assert first == task.evaluate(model)
    assert model.training  # evaluate puts the mode back
    # a second task instance evaluates on the very same held-out set
    assert bytelm(corpus_glob).evaluate(model) == first
    assert abs(first - math.log(256)) < 0.3


def test_models_start_from_the_torch_seed(corpus_glob: str) -> None:
    task = bytelm(corpus_glob)
    torch.manual_seed(3)
    a = task.build_model().state_dict()
    torch.manual_seed(3)
    b = task.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- load_task -----------------------------------------------------------------------------------


class ToyTask:
    name = "toy"
    num_shards = 1
    tokens_per_batch = 1

    def __init__(self, width: int) -> None:
        self.width = width

    def settings_dict(self) -> dict[str, Any]:
        return {"width": self.width}

    def build_model(self) -> nn.Module:
        return nn.Linear(self.width, 1)

    def train_batches(self, shard: int, seed: int) -> Any:
        while True:
            yield torch.zeros(1, self.width)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).sum()

    def evaluate(self, model: nn.Module, device: Any = "cpu") -> float:
        return 0.0


def make_toy_task(width: int = 3) -> ToyTask:
    return ToyTask(width)


def make_incomplete_task() -> object:
    return object()


def test_load_task_from_import_path() -> None:
    task = load_task(f"{__name__}:make_toy_task", {"width": 5})
    assert isinstance(task, ToyTask)
    assert task.build_model().in_features == 5


def test_load_task_checks_the_interface() -> None:
    with pytest.raises(TaskError, match="no method"):
        load_task(f"{__name__}:make_incomplete_task", {})


@pytest.mark.parametrize(
    "name",
    ["nosuch.module:factory", "shared.tasks:no_such_factory", "bad name", "bytelm2", "", "a:b:c", "mod:"],
)
def test_load_task_refuses_bad_names(name: str) -> None:
    with pytest.raises(TaskError):
        load_task(name, {})


def test_load_task_wraps_bad_settings_of_a_custom_factory() -> None:
    with pytest.raises(TaskError, match="rejected its settings"):
        load_task(f"{__name__}:make_toy_task", {"depth": 2})
