"""What every command line shares: errors end as one clear line, never a usage block or traceback;
``--version`` says the package's version and the wire protocol's.

Exit codes: 2 for a usage error (bad option or value), 1 for any
:class:`~shared.errors.AsyncLocoError` (bad setting, unreachable service) except a
:class:`~shared.errors.PermanentError`, which exits with its own code (65-77, see
:data:`shared.errors.PERMANENT_ERRORS` for the client, ``SERVE_PERMANENT_ERRORS`` for ``serve``),
130 when interrupted before the command's own signal handling is in place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, TypeVar

import click

from shared import PROTOCOL_VERSION
from shared.errors import AsyncLocoError

F = TypeVar("F", bound=Callable[..., Any])


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
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
            _err("interrupted")
            sys.exit(130)


class OneLineErrors(_OneLineMain, click.Group):
    """A click group (``asyncloco-coordinator``, ``asyncloco-client``) whose errors are one line."""


class OneLineErrorsCommand(_OneLineMain, click.Command):
    """A single click command (a benchmark script) whose errors are one line, as the groups'."""


def version_text() -> str:
    """``0.1.0 (protocol 2)``: the installed package's version, and the wire protocol's (a client
    and a coordinator must speak the same one)."""
    try:
        installed = package_version("asyncloco")
    except PackageNotFoundError:  # run from a checkout that was never installed
        installed = "unknown"
    return f"{installed} (protocol {PROTOCOL_VERSION})"


def version_option() -> Callable[[F], F]:
    """The ``--version`` option of a command group: prints ``PROG VERSION (protocol N)``, exits 0."""
    return click.version_option(version_text(), "--version", message="%(prog)s %(version)s",
                                help="Show the package's version and the protocol's, and exit.")
