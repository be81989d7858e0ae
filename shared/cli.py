"""What both command lines share: errors end as one clear line, never a usage block or traceback."""

from __future__ import annotations

import sys
from typing import Any

import click

from shared.errors import AsyncLocoError


def _err(text: str) -> None:
    click.echo(text, err=True)


class OneLineErrors(click.Group):
    """A click group whose errors end as one line on stderr.

    Exit codes: 2 for a usage error (bad option or value), 1 for any
    :class:`~shared.errors.AsyncLocoError` (bad setting, unreachable service, bad checkpoint),
    130 when interrupted before the command's own signal handling is in place.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            _err(f"error: {exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _err(f"error: {exc.format_message()}")
            sys.exit(exc.exit_code)
        except click.Abort:
            _err("aborted")
            sys.exit(130)
        except AsyncLocoError as exc:
            _err(f"error: {exc}")
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
            _err("interrupted")
            sys.exit(130)
