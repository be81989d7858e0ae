"""The one exception hierarchy of asyncloco.

The CLIs turn any :class:`AsyncLocoError` into one clear line and its ``exit_code``: 1, except
for a :class:`PermanentError`, a mistake that no retry or restart can cure, which has its own code
so that a service manager can be told not to restart (systemd: ``RestartPreventExitStatus=``; the
codes are those of BSD's sysexits.h). A :class:`ProtocolError` carries a short machine-readable
``reason`` that the coordinator counts in its status (``rejected_by_reason``).
"""

from __future__ import annotations


class AsyncLocoError(Exception):
    """Base class of every error asyncloco raises on purpose."""

    exit_code = 1  # what the CLIs exit with after printing it


class ConfigError(AsyncLocoError):
    """A setting is invalid (bad CLI option, bad task spec, inconsistent config)."""


class ProtocolError(AsyncLocoError):
    """Bytes from the network do not form a valid message.

    ``reason`` is a short stable slug (``"undecodable"``, ``"wrong_schema"``, ``"too_large"`` ...)
    used as a counter key; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class ProtocolVersionError(ProtocolError):
    """A message of another protocol version: ``theirs`` is the version it says it speaks."""

    def __init__(self, theirs: int, ours: int) -> None:
        super().__init__("protocol_version", f"protocol {theirs} not supported (expected {ours})")
        self.theirs = theirs
        self.ours = ours


class SnapshotError(AsyncLocoError):
    """A snapshot could not be read whole (missing chunk, bad hash, bad manifest)."""


class SnapshotMissing(SnapshotError):
    """No snapshot has been published yet for this run, or it expired while being read."""


class SnapshotUntrusted(SnapshotError):
    """What Redis holds is not what this run's coordinator signed: an unsigned or forged manifest
    or plan, a signed one replayed under another version's key, or a chunk that fails the signed
    hash. It is never used; a client reports it and waits for a good one."""


class SnapshotOtherProtocol(SnapshotUntrusted):
    """A manifest or plan in another protocol version (``theirs``): this program cannot read it,
    nor check its signature. The envelope's version is not signed, so it is waited out like any
    unreadable snapshot until the caller decides that it is the run's and not a forgery."""

    def __init__(self, message: str, *, theirs: int) -> None:
        super().__init__(message)
        self.theirs = theirs


class ServiceUnavailable(AsyncLocoError):
    """Redis or RabbitMQ cannot be reached (after the retries the caller allowed)."""


class TaskError(AsyncLocoError):
    """A task cannot be loaded or its data cannot be found."""


class PermanentError(AsyncLocoError):
    """A mistake that retrying cannot fix: the process ends with this class's ``exit_code``."""


class NoSuchRun(PermanentError):
    """Nothing of the run was ever published where the client looks (a mistyped run name or
    Redis URL), after the grace period it was given."""

    exit_code = 66  # EX_NOINPUT


class Revoked(PermanentError):
    """A server refuses the credentials it accepted earlier in this process: the volunteer's
    invitation was revoked (or expired)."""

    exit_code = 67  # EX_NOUSER


class UnknownHost(PermanentError):
    """The server's host name does not resolve (DNS says it does not exist), at first contact."""

    exit_code = 68  # EX_NOHOST


class NoService(PermanentError):
    """Nothing at the server's address speaks its protocol at first contact: connection refused
    (a wrong port, or the server not started), or another kind of server answers."""

    exit_code = 69  # EX_UNAVAILABLE


class ProtocolMismatch(PermanentError):
    """The run's coordinator speaks another protocol version than this program: one of the two
    needs upgrading (the message says which)."""

    exit_code = 76  # EX_PROTOCOL


class AccessRefused(PermanentError):
    """A server refuses the credentials (wrong user or password, no password given, or no
    permission for the run) and never accepted them in this process."""

    exit_code = 77  # EX_NOPERM


class CheckpointUnusable(ConfigError, PermanentError):
    """The coordinator's checkpoint cannot be used as asked: unreadable or of another format,
    missing under ``--resume``, present without ``--resume`` or ``--fresh``, or its directory
    cannot be written. A ConfigError too, so that callers that catch those still do."""

    exit_code = 65  # EX_DATAERR


class RunTaken(ConfigError, PermanentError):
    """Another live coordinator serves the run: it holds the run's lease past the wait, or took
    the run over while this one was paused. A ConfigError too, as :class:`CheckpointUnusable`."""

    exit_code = 73  # EX_CANTCREAT: the run's lease cannot be created


# Every permanent mistake of the client, by exit code (docs, its systemd unit's
# RestartPreventExitStatus=).
PERMANENT_ERRORS: tuple[type[PermanentError], ...] = (
    NoSuchRun, Revoked, UnknownHost, NoService, ProtocolMismatch, AccessRefused)
# Those of `asyncloco-coordinator serve` (README's operator table, deploy/systemd's coordinator unit).
SERVE_PERMANENT_ERRORS: tuple[type[PermanentError], ...] = (
    CheckpointUnusable, UnknownHost, NoService, RunTaken, AccessRefused)
