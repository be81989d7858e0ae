"""A TCP relay in front of the real Redis that counts the commands one client sends through it.

Every command a client sends crosses the relay as a RESP array (``*N`` then N bulk strings); the
relay parses that stream as it forwards it, unchanged, and notes each command's name and when it
went by. Only the clients pointed at the relay are counted, whatever else talks to the same server
(other tests, a publisher in the same test), which ``INFO commandstats`` cannot tell apart; and no
MONITOR is involved.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from tests.relay import Relay


class RespCommands:
    """Incremental parser of a client's RESP request stream: the commands it holds, as they end."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        """Take the next bytes of the stream; return the names of the commands they completed."""
        self._buffer += data
        names = []
        while (name := self._one()) is not None:
            names.append(name)
        return names

    def _one(self) -> str | None:
        buffer = self._buffer
        if not buffer:
            return None
        if not buffer.startswith(b"*"):
            raise ValueError(f"not a RESP array: {buffer[:32]!r}")
        end = buffer.find(b"\r\n")
        if end < 0:
            return None
        count, position, words = int(buffer[1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return None
            if buffer[position:position + 1] != b"$":
                raise ValueError(f"not a bulk string: {buffer[position:position + 32]!r}")
            start = end + 2
            stop = start + int(buffer[position + 1:end])
            if len(buffer) < stop + 2:
                return None
            words.append(buffer[start:stop])
            position = stop + 2
        self._buffer = buffer[position:]
        return words[0].decode(errors="replace").upper() if words else ""


class CountingRelay(Relay):
    """127.0.0.1:``port`` relays to Redis at 127.0.0.1:``target_port`` and notes every command sent
    through it, with its ``time.monotonic()``. A context manager: listening on entry, every socket
    closed on exit."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.commands: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._parsers: dict[int, RespCommands] = {}

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def between(self, start: float, end: float) -> list[str]:
        """Names of the commands sent from ``start`` to ``end`` (``time.monotonic()``)."""
        with self._lock:
            return [name for at, name in self.commands if start <= at <= end]

    def on_request(self, data: bytes) -> None:
        # one parser per connection: each relaying thread is one connection's request stream
        parser = self._parsers.setdefault(threading.get_ident(), RespCommands())
        names = parser.feed(data)
        now = time.monotonic()
        with self._lock:
            self.commands.extend((now, name) for name in names)

    def __enter__(self) -> CountingRelay:
        self.up()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()
