"""The one exception hierarchy of asyncloco.

The CLIs turn any :class:`AsyncLocoError` into one clear line and exit code 1. A
:class:`ProtocolError` carries a short machine-readable ``reason`` that the coordinator counts in
its status (``rejected_by_reason``).
"""

from __future__ import annotations


class AsyncLocoError(Exception):
    """Base class of every error asyncloco raises on purpose."""


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


class SnapshotError(AsyncLocoError):
    """A snapshot could not be read whole (missing chunk, bad hash, bad manifest)."""


class SnapshotMissing(SnapshotError):
    """No snapshot has been published yet for this run, or it expired while being read."""


class SnapshotUntrusted(SnapshotError):
    """What Redis holds is not what this run's coordinator signed: an unsigned or forged manifest
    or plan, a signed one replayed under another version's key, or a chunk that fails the signed
    hash. It is never used; a client reports it and waits for a good one."""


class ServiceUnavailable(AsyncLocoError):
    """Redis or RabbitMQ cannot be reached (after the retries the caller allowed)."""


class TaskError(AsyncLocoError):
    """A task cannot be loaded or its data cannot be found."""
