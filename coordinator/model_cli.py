"""``asyncloco-coordinator key | export | sample``: what a run's checkpoint directory holds.

Run on the coordinator's machine; they read its files (the signing key, the newest committed
checkpoint), never the servers, and are safe while the coordinator serves.
"""

from __future__ import annotations

from pathlib import Path

import click

from coordinator.options import checkpoint_dir_option, option, run_checkpoint_dir, signing_key_path
from shared.signing import KEY_FILE_NAME, SigningKey


@click.command("key")
@option("--signing-key", env="SIGNING_KEY", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help=f"The coordinator's private key file [default: CHECKPOINT_DIR/{KEY_FILE_NAME}].")
@checkpoint_dir_option()
@option("--run", env="RUN", default="default", help="Run name (picks the default checkpoint directory).")
def key_command(signing_key: Path | None, checkpoint_dir: Path | None, run: str) -> None:
    """Print the coordinator's public key (64 hex digits), creating the key file if missing.

    Give it to volunteers (`asyncloco-client join --coordinator-key HEX`; an invite token carries
    it): clients refuse every snapshot and plan not signed by the matching private key.
    """
    click.echo(SigningKey.load_or_create(signing_key_path(signing_key, checkpoint_dir, run)).public_hex)


@click.command("export")
@click.argument("run")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@checkpoint_dir_option()
def export_command(run: str, directory: Path, checkpoint_dir: Path | None) -> None:
    """Write the current model of run RUN to DIRECTORY: model.safetensors and config.json.

    Read from the run's checkpoint on this machine (the newest commit), never from the servers;
    safe while the coordinator serves. config.json holds what builds the model (task, settings).
    """
    from coordinator.export import export_model

    exported = export_model(run_checkpoint_dir(run, checkpoint_dir), directory)
    click.echo(f"exported run {run} version {exported.version} ({exported.parameters} parameters) to "
               f"{exported.model} and {exported.config}")


@click.command("sample")
@click.argument("run")
@option("--prompt", env="SAMPLE_PROMPT", required=True, help="Text the model continues (UTF-8).")
@option("--bytes", "n_bytes", env="SAMPLE_BYTES", type=click.IntRange(1, 65536), default=256,
        help="How many bytes to generate after the prompt.")
@option("--temperature", env="SAMPLE_TEMPERATURE", type=click.FloatRange(0), default=0.8,
        help="Sampling temperature; 0 = greedy (always the likeliest next byte).")
@option("--seed", env="SAMPLE_SEED", type=int, default=0,
        help="Seed of the sampling: the same model, prompt, temperature and seed give the same text.")
@checkpoint_dir_option()
def sample_command(run: str, prompt: str, n_bytes: int, temperature: float, seed: int,
                   checkpoint_dir: Path | None) -> None:
    """Print the prompt and N bytes that run RUN's newest committed model (built-in task) adds.

    Read from the run's checkpoint on this machine, like `export`; safe while the coordinator
    serves. Bytes that are not printable UTF-8 are shown as U+FFFD.
    """
    from coordinator.sample import SampleConfig, printable, sample_run

    config = SampleConfig(prompt=prompt.encode(), n_bytes=n_bytes, temperature=temperature, seed=seed)
    done = sample_run(run_checkpoint_dir(run, checkpoint_dir), config)
    loss = "no eval yet" if done.eval_loss is None else f"eval loss {done.eval_loss:.4f}"
    click.echo(f"run {run} version {done.version} ({loss}), temperature {temperature:g}, seed {seed}:",
               err=True)
    click.echo(printable(done.text))
