"""``sample``: text from a run's newest committed model, read from its checkpoint (no servers): the
prompt and N more bytes, the ones the checkpoint's θ predicts, the same for the same seed; one line
for a run with nothing committed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.checkpoint import save_checkpoint
from coordinator.run_state import RunState
from coordinator.sample import SampleConfig, generate, load_model, printable, sample_run
from shared.errors import ConfigError
from tests.services import small_config
from tests.unit.test_coordinator_cli import assert_one_line_error, invoke

PROMPT = "def main("


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of run ``smp`` at version 5 whose θ is not the initial model's (read only)."""
    tmp_path = tmp_path_factory.mktemp("sample")
    run = RunState.open(small_config("smp", tmp_path), None, None)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in run.optimizer.params.values():
            param.add_(0.3 * torch.randn(param.shape, generator=noise))
    run.version = 5
    run.evaluate()
    save_checkpoint(tmp_path / "ckpt", run.checkpoint())
    return tmp_path / "ckpt"


def test_sample_gives_the_prompt_and_n_more_bytes_from_the_checkpoints_model(checkpoint_dir: Path) -> None:
    done = sample_run(checkpoint_dir, SampleConfig(prompt=PROMPT.encode(), n_bytes=40, temperature=0))
    assert done.version == 5 and done.eval_loss is not None
    assert done.text.startswith(PROMPT.encode()) and len(done.text) == len(PROMPT) + 40
    committed = load_model(checkpoint_dir)
    with torch.no_grad():
        logits = committed.model(torch.tensor([list(PROMPT.encode())]))[0, -1]
    assert done.text[len(PROMPT)] == int(torch.argmax(logits))  # greedy: the likeliest byte of θ
    fresh = RunState.open(small_config("smp", checkpoint_dir.parent / "fresh"), None, None)
    for name, param in committed.model.named_parameters():
        assert not torch.equal(param, fresh.optimizer.params[name]), name  # θ, not a rebuild


def test_the_same_seed_gives_the_same_text_and_another_seed_another(checkpoint_dir: Path) -> None:
    committed = load_model(checkpoint_dir)

    def text(seed: int) -> bytes:
        config = SampleConfig(prompt=PROMPT.encode(), n_bytes=64, temperature=1.0, seed=seed)
        return generate(committed.model, config, seq_len=committed.seq_len)

    assert text(3) == text(3)
    assert text(3) != text(4)


def test_a_prompt_longer_than_the_context_window_is_continued_from_its_end(checkpoint_dir: Path) -> None:
    committed = load_model(checkpoint_dir)
    prompt = b"x" * (committed.seq_len + 50)
    out = generate(committed.model, SampleConfig(prompt=prompt, n_bytes=3, temperature=0),
                   seq_len=committed.seq_len)
    assert out[:-3] == prompt and len(out) == len(prompt) + 3


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"prompt": b""}, "--prompt must not be empty"),
    ({"prompt": b"x", "n_bytes": 0}, "--bytes must be 1 to"),
    ({"prompt": b"x", "temperature": -1.0}, "--temperature must be >= 0"),
])
def test_sample_config_refuses_what_cannot_be_sampled(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        SampleConfig(**kwargs)  # type: ignore[arg-type]


def test_printable_keeps_text_and_masks_control_bytes() -> None:
    assert printable("héllo\n\tx".encode()) == "héllo\n\tx"
    assert printable(b"a\x1b[2Jb\xff") == "a\ufffd[2Jb\ufffd"


# --- the command ---------------------------------------------------------------------------------


def test_the_sample_command_prints_the_prompt_and_its_continuation(checkpoint_dir: Path) -> None:
    args = ["sample", "smp", "--prompt", PROMPT, "--bytes", "32", "--temperature", "0",
            "--checkpoint-dir", str(checkpoint_dir)]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PROMPT) and result.stdout.endswith("\n")
    assert len(result.stdout) >= len(PROMPT) + 1
    assert result.stderr.startswith("run smp version 5 (eval loss ")
    assert invoke(args).stdout == result.stdout  # greedy: the same text again


def test_sample_of_a_run_with_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = invoke(["sample", "new", "--prompt", "x", "--checkpoint-dir", str(tmp_path / "none")])
    assert_one_line_error(result, 1, f"no checkpoint in {tmp_path / 'none'}: this run has no committed model")


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "Missing option '--prompt'"),
    (["--prompt", "x", "--bytes", "0"], "--bytes"),
    (["--prompt", "x", "--temperature", "hot"], "--temperature"),
])
def test_the_sample_command_refuses_bad_arguments_in_one_line(args: list[str], fragment: str) -> None:
    assert_one_line_error(invoke(["sample", "r", *args]), 2, fragment)
