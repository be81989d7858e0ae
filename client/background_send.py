"""A delta published by a thread of its own while the next round trains (``--overlap``).

Without ``--overlap`` a round's upload is part of the pause between rounds: the next round must
start from a snapshot that holds the delta, so it waits for the upload and then for the commit.
With it the next round starts at once from the newest snapshot moved by the delta in flight
(:mod:`client.overlap`), and nothing in it needs the upload to be done: the worker hands the delta
to a :class:`BackgroundSend` and trains. It finishes the send (waits for it: on a link fast
enough for the rounds it is long done) before it sends another delta, stops or closes, so the
uploader's AMQP connection is only ever used by one thread at a time, and a permanent refusal
(revoked credentials) raised in the thread is raised again where the worker waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from client.uploader import DeltaUploader, Upload
from shared.protocol import DeltaMessage


class BackgroundSend:
    """``uploader.send(message)`` running in a thread; :meth:`wait` returns its :class:`Upload`."""

    def __init__(self, uploader: DeltaUploader, message: DeltaMessage, *, give_up: Callable[[], bool],
                 run_id: str, base_version: int) -> None:
        self.delta_id = message.delta_id
        self.seq = message.seq
        self.run_id = run_id
        self.base_version = base_version
        self._result: Upload | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(uploader, message, give_up),
                                        name=f"asyncloco-send-{message.seq}", daemon=True)
        self._thread.start()

    def _run(self, uploader: DeltaUploader, message: DeltaMessage, give_up: Callable[[], bool]) -> None:
        try:
            self._result = uploader.send(message, give_up=give_up)
        except BaseException as exc:  # noqa: BLE001 - raised again in the thread that waits
            self._error = exc

    @property
    def busy(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> Upload | None:
        """The upload's outcome once the thread is done (None if ``timeout_s`` passed first); what
        the send raised is raised here."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return None
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
