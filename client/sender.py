"""How a worker's deltas go out: at once, or from a thread of their own while the next round
trains (``--overlap``).

Without ``--overlap`` a round's upload is part of the pause between rounds: the next round must
start from a snapshot that holds the delta, so it waits for the upload and then for the commit.
With it the next round starts at once from the newest snapshot moved by the delta in flight
(:mod:`client.overlap`), and nothing in it needs the upload to be done: the worker hands the delta
to a :class:`BackgroundSend` and trains. :class:`DeltaSender` finishes that send (waits for it;
on a link fast enough for the rounds it is long done) before it sends another delta, stops or
closes, so the uploader's AMQP connection is only ever used by one thread at a time, and a
permanent refusal (revoked credentials) raised in the thread is raised again where the worker
waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from client.uploader import DeltaUploader, Upload
from shared.keys import RunKeys
from shared.protocol import DeltaMessage
from shared.round_plan import RoundPlan

# (upload, delta id, seq, run id, base version) of each send once the broker answered or it was given up
OnSent = Callable[[Upload, str, int, str, int], None]


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


class DeltaSender:
    """The worker's sends through one :class:`DeltaUploader`: :meth:`send` publishes now or behind
    the next round, and ``on_sent`` hears how each went once that is known (for a background
    send: when it is finished, before the next one or a stop)."""

    def __init__(self, uploader: DeltaUploader, keys: RunKeys, client_id: str, *,
                 give_up: Callable[[], bool], on_sent: OnSent) -> None:
        self.uploader = uploader
        self.keys = keys
        self.client_id = client_id
        self.give_up = give_up
        self.on_sent = on_sent
        self.sending: BackgroundSend | None = None  # the delta a thread is publishing now

    def send(self, message: DeltaMessage, *, run_id: str, base_version: int, plan: RoundPlan,
             behind: bool) -> Upload:
        """Publish ``message`` to this client's queue of the plan's: now, or (``behind``) from a
        thread while the next round trains, when the Upload returned is what is known so far
        (``confirmed`` until told otherwise; ``upload_s``: what this round waited on the last
        background send, which is finished first either way)."""
        waited_s = self.finish()
        self.uploader.queue = self.keys.delta_queue_for(self.client_id, plan.delta_queues)  # the routing key
        if behind:
            self.sending = BackgroundSend(self.uploader, message, give_up=self.give_up, run_id=run_id,
                                          base_version=base_version)
            return Upload(confirmed=True, body_bytes=sum(len(b) for b in message.tensors.values()),
                          upload_s=waited_s)
        upload = self.uploader.send(message, give_up=self.give_up)
        self.on_sent(upload, message.delta_id, message.seq, run_id, base_version)
        return replace(upload, upload_s=upload.upload_s + waited_s)

    def finish(self) -> float:
        """Wait for the background send, if any, and tell ``on_sent``; the seconds waited (what
        the send raised, a permanent refusal, is raised here)."""
        sending, self.sending = self.sending, None
        if sending is None:
            return 0.0
        started = time.monotonic()
        upload = sending.wait()
        assert upload is not None  # waited without a timeout
        self.on_sent(upload, sending.delta_id, sending.seq, sending.run_id, sending.base_version)
        return time.monotonic() - started

    def keepalive(self) -> None:
        """Let the idle connection answer heartbeats (a send in flight keeps it busy itself)."""
        if self.sending is None or not self.sending.busy:
            self.uploader.keepalive()

    def close(self, stop: threading.Event, grace_s: float) -> None:
        """Give a background send still going out ``grace_s`` more (a stop makes it give up),
        then close the connection."""
        if self.sending is not None and self.sending.busy:
            stop.set()
            self.sending.wait(grace_s + 10.0)
        self.uploader.close()
