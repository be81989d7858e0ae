"""Publisher confirms with several publishes awaiting theirs at once, on a pika BlockingChannel.

In confirm mode (``BlockingChannel.confirm_delivery()``) pika's ``basic_publish`` waits for the
message's own confirm before it returns: one message in flight, so a delta in parts pays a whole
broker round trip (receive, persist, confirm) per part. :class:`ConfirmedChannel` puts the channel
in confirm mode through the asynchronous channel that BlockingChannel wraps (pika's
:class:`pika.channel.Channel`, its ``_impl``), with callbacks of its own: a publish returns once
its bytes are written, and the broker's acks, nacks and returns are matched to messages by
delivery tag (the broker numbers a confirm-mode channel's publishes 1, 2, 3, ...) while the
connection's I/O runs.

What counts as confirmed is unchanged: the broker's ``Basic.Ack`` of a message it has routed (and,
persistent on a durable queue, written to disk). A mandatory message that no queue took comes back
(``Basic.Return``) before its ack: that is :class:`pika.exceptions.UnroutableError`, and a
``Basic.Nack`` is :class:`pika.exceptions.NackError`, as with pika's blocking confirms. A channel
that the broker closes raises its :class:`pika.exceptions.ChannelClosedByBroker` from the next
call; a lost connection raises pika's connection errors, as ever.
"""

from __future__ import annotations

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, ReturnedMessage

# The longest one wait for I/O lasts before it looks again (heartbeats are answered meanwhile).
WAIT_SLICE_S = 1.0


class ConfirmedChannel:
    """``channel`` (open, not yet in confirm mode) in confirm mode with many publishes outstanding.

    :meth:`publish` sends; :meth:`settled` returns what was settled since it was last asked (acks
    and nacks also come in while a publish writes its bytes): message id -> None (confirmed) or
    the exception that says why not; :meth:`wait` runs I/O until something is settled, then
    returns the same.
    """

    def __init__(self, channel: BlockingChannel) -> None:
        self.channel = channel
        self.connection = channel.connection
        self._next_tag = 1  # the delivery tag the broker gives the next publish
        self._outstanding: dict[int, str] = {}  # delivery tag -> message id, awaiting ack or nack
        self._returned: dict[str, ReturnedMessage] = {}  # message id -> its Basic.Return (before its ack)
        self._settled: dict[str, Exception | None] = {}
        self._closed: Exception | None = None
        selected: list[pika.frame.Method] = []
        asynchronous = channel._impl  # pika's Channel under the BlockingChannel: see the module docstring
        asynchronous.add_on_return_callback(self._on_return)
        asynchronous.add_on_close_callback(self._on_close)
        asynchronous.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
        while not selected:
            self._raise_if_closed()
            self.connection.process_data_events(time_limit=WAIT_SLICE_S)

    @property
    def outstanding(self) -> int:
        """Publishes sent and not yet confirmed or refused."""
        return len(self._outstanding)

    def publish(self, *, exchange: str, routing_key: str, body: bytes,
                properties: pika.BasicProperties) -> None:
        """Send ``body`` as a mandatory message named by ``properties.message_id`` (unique among
        those outstanding); return once its bytes are written, without waiting for its confirm."""
        self._raise_if_closed()
        assert properties.message_id is not None and properties.message_id not in self._outstanding.values()
        self._outstanding[self._next_tag] = properties.message_id
        self._next_tag += 1
        # Not in BlockingChannel's own confirm mode: this returns once the frames are written.
        self.channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                                   properties=properties, mandatory=True)

    def settled(self) -> dict[str, Exception | None]:
        """Every publish settled since the last call (or :meth:`wait`), without waiting."""
        settled, self._settled = self._settled, {}
        return settled

    def wait(self) -> dict[str, Exception | None]:
        """Run I/O until some publish is settled (there must be one outstanding, or something
        settled already); return every one settled since the last call."""
        assert self._outstanding or self._settled, "nothing to wait for"
        while not self._settled:
            self._raise_if_closed()
            self.connection.process_data_events(time_limit=WAIT_SLICE_S)
        return self.settled()

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            raise self._closed

    # -- pika's callbacks (called while I/O runs) -------------------------------------------------

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        assert isinstance(method, (pika.spec.Basic.Ack, pika.spec.Basic.Nack))
        tag = method.delivery_tag
        tags = [t for t in self._outstanding if t <= tag] if method.multiple else [tag]
        for settled in tags:
            message_id = self._outstanding.pop(settled, None)
            if message_id is None:
                continue
            returned = self._returned.pop(message_id, None)
            if isinstance(method, pika.spec.Basic.Nack):
                self._settled[message_id] = pika.exceptions.NackError([returned] if returned else [])
            elif returned is not None:
                self._settled[message_id] = pika.exceptions.UnroutableError([returned])
            else:
                self._settled[message_id] = None
        self.connection.call_later(0, _nothing)  # process_data_events returns as soon as it can

    def _on_return(self, channel: pika.channel.Channel, method: pika.spec.Basic.Return,
                   properties: pika.spec.BasicProperties, body: bytes) -> None:
        if properties.message_id is not None:
            self._returned[properties.message_id] = ReturnedMessage(method, properties, body)

    def _on_close(self, channel: pika.channel.Channel, reason: Exception) -> None:
        self._closed = reason
        if self.connection.is_open:
            self.connection.call_later(0, _nothing)


def _nothing() -> None:
    """A timer's callback whose only use is to end ``process_data_events``' wait."""
