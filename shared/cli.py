"""What every command line shares: errors end as one clear line, never a usage block or traceback.

Exit codes: 2 for a usage error (bad option or value), 1 for any
:class:`~shared.errors.AsyncLocoError` (bad setting, unreachable service, bad checkpoint),
130 when interrupted before the command's own signal handling is in place.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from shared.errors import AsyncLocoError


def _err(text: str) -> None:
    click.echo(text, err=True)


class _OneLineMain:
    """``main`` of a click command or group that ends every error as one line on stderr."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)  # type: ignore[misc]
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


class OneLineErrors(_OneLineMain, click.Group):
    """A click group (``asyncloco-coordinator``, ``asyncloco-client``) whose errors are one line."""


class OneLineErrorsCommand(_OneLineMain, click.Command):
    """A single click command (a benchmark script) whose errors are one line, as the groups'."""
