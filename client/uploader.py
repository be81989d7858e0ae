"""Sends deltas to the coordinator's queue on RabbitMQ, with publisher confirms.

:meth:`DeltaUploader.send` encodes a :class:`~shared.protocol.DeltaMessage`, holds it to the size
limit of a delta, and publishes it as one message or, if it is bigger than ``part_bytes``, as
:class:`~shared.delta_parts.DeltaPart` messages in order (the coordinator puts them together).

The parts of a delta go out with up to ``max_unconfirmed`` (4) of them awaiting the broker's
confirm at once (:class:`client.confirms.ConfirmedChannel`), so that the broker persists and
confirms one part while the next ones are on the wire, instead of a round trip per part.

A delta counts as sent only once the broker has confirmed it, every part of it. Until then the
*same bytes* (same ``seq``, same ``message_id``) are retried with capped exponential backoff
through every kind of trouble: the queue not declared yet (the publish comes back unroutable),
the broker refusing it (nack, e.g. the queue is full with ``overflow=reject-publish``), or the
connection dropping. A part the broker confirmed is not sent again; after any trouble the parts
not yet confirmed are, once those in flight are settled. A duplicate that results from a lost
confirm is harmless: the coordinator de-duplicates on ``(client_id, seq)`` (and parts by their
index). An outage is said once at WARNING (the client's default level), and so is its end. A
mistake that retrying cannot cure ends the upload with its
:class:`~shared.errors.PermanentError` instead (:class:`shared.contact.ServerContact`: wrong
credentials, unknown host, nothing listening at first contact, a revoked user; and a broker that
refuses this user the run's exchange, 403).

The connection goes to the first broker URL that answers, tried in order on every (re)connect
(``--amqp`` may list several nodes of one RabbitMQ cluster), so a client whose node dies goes on
through another one after its next backoff.

The client never declares the delta queue: the coordinator owns it and its arguments.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from client.confirms import ConfirmedChannel
from shared.codecs import Codec
from shared.contact import ServerContact
from shared.delta_parts import PART_TYPE, DeltaSplit
from shared.errors import AccessRefused, ConfigError, PermanentError, Revoked, ServiceUnavailable
from shared.keys import RunKeys
from shared.protocol import DEFAULT_DELTA_LIMITS, DELTA_ENVELOPE_BYTES, DeltaMessage, MiB
from shared.settings import (
    ConnectionSettings,
    RetryPolicy,
    amqp_parameter_list,
    amqp_parameters,
    open_amqp,
    sleep_interruptibly,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-msgpack"
APP_ID = "asyncloco-client"
# Give up on a broker that blocks publishers (memory or disk alarm) after this long, and reconnect.
BLOCKED_TIMEOUT_S = 60.0
# What a failed connection or publish can raise: pika's errors, socket errors, and the connection
# workflow's own (a handshake that timed out is not an AMQPError).
AMQP_FAILURES: tuple[type[Exception], ...] = (pika.exceptions.AMQPError, OSError, AMQPConnectorException)
# Parts of a delta awaiting the broker's confirm at once: enough to keep the broker busy persisting
# one part while the next arrive (benchmarks/part_upload.py); each is at most ``part_bytes`` more
# that the broker holds unconfirmed for this client.
MAX_UNCONFIRMED = 4


@dataclass(frozen=True)
class Upload:
    """How sending one delta went: ``confirmed`` is False only if ``give_up()`` ended it first."""

    confirmed: bool
    body_bytes: int  # the encoded delta message, before any split into parts
    upload_s: float  # wall time of the publishes, retries included


class DeltaUploader:
    """Publishes delta messages to the run's delta exchange; owns the AMQP connection.

    Every message carries the broker user it is sent as in its ``user_id`` property: RabbitMQ
    refuses a publish whose user_id is not the connection's own, so the coordinator knows which
    volunteer's credentials sent it.

    The connection is opened lazily and reopened after any failure. :meth:`keepalive` lets a
    caller that is busy training service heartbeats, so an idle connection is not dropped.
    ``part_bytes`` is the most a message of a delta carries; a bigger delta goes in parts, up to
    ``max_unconfirmed`` of them awaiting their confirms at once (1: each waits for the one before).
    """

    def __init__(
        self, connection: ConnectionSettings, *, keys: RunKeys, retry: RetryPolicy, part_bytes: int,
        max_unconfirmed: int = MAX_UNCONFIRMED,
    ) -> None:
        if max_unconfirmed < 1:
            raise ConfigError(f"max_unconfirmed must be >= 1, got {max_unconfirmed}")
        self.settings = connection
        self.keys = keys
        # the routing key: the queue's name (the worker sets this client's of the plan's delta queues)
        self.queue = keys.delta_queue
        self.user = amqp_parameters(connection).credentials.username  # every URL's (settings check)
        self.retry = retry
        self.part_bytes = part_bytes
        self.max_unconfirmed = max_unconfirmed
        self.contact = ServerContact(connection.amqp_url, option="--amqp")
        self._connection: pika.BlockingConnection | None = None
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self._confirms: ConfirmedChannel | None = None  # the channel, in confirm mode
        self._last_io = 0.0  # time.monotonic() of the last time the connection did I/O
        self._down_since: float | None = None  # time.monotonic() the connection was lost, until back
        self._published = False  # the broker confirmed a publish of this user (then a 403 is a revocation)

    def _parameters(self) -> list[pika.URLParameters]:
        """One set per broker URL, tried in order on every (re)connect: a client whose node died
        moves on to the next that answers."""
        candidates = amqp_parameter_list(self.settings)  # TLS (amqps://) as the settings say
        for params in candidates:
            params.heartbeat = self.settings.heartbeat_s
            params.socket_timeout = self.settings.socket_timeout_s
            params.stack_timeout = self.settings.socket_timeout_s * 2
            params.blocked_connection_timeout = BLOCKED_TIMEOUT_S
            params.connection_attempts = 1  # retries are ours, with backoff and a stop check
            params.client_properties = {"connection_name": f"asyncloco-client {self.queue}"}
        return candidates

    def _open(self) -> ConfirmedChannel:
        if self._confirms is not None and self._channel is not None and self._channel.is_open:
            return self._confirms
        self.close()
        # A refused certificate raises ConfigError here, a refused password or a wrong address a
        # PermanentError: never retried, they end the client.
        try:
            self._connection = open_amqp(self.settings, self._parameters())
        except AMQP_FAILURES as exc:
            refusal = self.contact.refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise
        self.contact.answered()
        if self._down_since is not None:
            log.warning("RabbitMQ is back after %.0f s", time.monotonic() - self._down_since)
            self._down_since = None
        channel = self._connection.channel()
        self._confirms = ConfirmedChannel(channel)  # confirm mode: every publish gets an ack or a nack
        self._channel = channel
        self._last_io = time.monotonic()
        return self._confirms

    def connect(self) -> None:
        """Open the connection now (the first contact), so that a permanent mistake ends the client
        before it trains; an outage is only logged (sending retries it)."""
        try:
            self._open()
        except AMQP_FAILURES as exc:
            self._lost(f"RabbitMQ unavailable ({type(exc).__name__}: {exc}); will retry when sending")

    def _lost(self, why: str) -> None:
        """Say once per outage that the connection is gone."""
        self.close()
        if self._down_since is None:
            log.warning("%s", why)
            self._down_since = time.monotonic()

    def close(self) -> None:
        """Close the connection if open (errors on the way out are irrelevant and ignored)."""
        connection, self._connection, self._channel, self._confirms = self._connection, None, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass

    def keepalive(self, every_s: float = 5.0) -> None:
        """Let the open connection send and answer heartbeats, at most every ``every_s`` seconds."""
        if self._connection is None or time.monotonic() - self._last_io < every_s:
            return
        self._last_io = time.monotonic()
        try:
            self._connection.process_data_events(time_limit=0)
        except AMQP_FAILURES as exc:
            self._lost(f"RabbitMQ connection lost while training ({type(exc).__name__}: {exc}); "
                       "reconnecting to send the delta")

    @staticmethod
    def check_payload(tensors: dict[str, bytes], codec: str) -> None:
        """Raise :class:`ConfigError` if encoded tensors this big can never make a delta.

        Checked before a sequence number is reserved for them: a number is not spent on a delta
        that could not be sent.
        """
        _check_delta_size(sum(len(blob) for blob in tensors.values()), codec)

    @staticmethod
    def check_model(numels: Mapping[str, int], codec: Codec) -> None:
        """Raise :class:`ConfigError` if this model's deltas (tensors of ``numels`` elements) can
        never be sent with ``codec``: checked when a run's model is built, before any training."""
        _check_delta_size(sum(codec.encoded_bytes(n) for n in numels.values()), codec.name)

    def send(self, message: DeltaMessage, *, give_up: Callable[[], bool] = lambda: False) -> Upload:
        """Encode ``message`` and publish it whole, or in parts if over ``part_bytes``, until confirmed.

        Raises :class:`ConfigError` if the encoded message is over the limit of a delta. A delta
        left in part when ``give_up()`` ends the upload is discarded by the coordinator after its
        part timeout.
        """
        body = message.encode()
        limit = DEFAULT_DELTA_LIMITS.max_delta_bytes
        if len(body) > limit:
            raise ConfigError(
                f"delta message is {len(body) / MiB:.1f} MiB, over the {limit // MiB} MiB limit of a delta; "
                "use --codec int8 or int4"
            )
        started = time.monotonic()
        message_id = message.delta_id
        if len(body) <= self.part_bytes:
            confirmed = self.publish(body, message_id=message_id, give_up=give_up)
        else:
            split = DeltaSplit.of(body, part_bytes=self.part_bytes, run_id=message.run_id,
                                  client_id=message.client_id, seq=message.seq)
            log.info("delta %s is %.1f MiB: sending it in %d parts", message_id, len(body) / MiB, split.count)
            # each part encoded as it is sent, straight from the delta's bytes (and again, byte for
            # byte, if it must be sent again)
            confirmed = self._publish_all(
                [(f"{message_id}/{i}", functools.partial(split.encoded, i)) for i in range(split.count)],
                name=message_id, message_type=PART_TYPE, give_up=give_up)
        return Upload(confirmed=confirmed, body_bytes=len(body), upload_s=time.monotonic() - started)

    def publish(
        self,
        body: bytes,
        *,
        message_id: str,
        message_type: str | None = None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Publish ``body`` until the broker confirms it; return True then, False if ``give_up()``.

        Raise :class:`ServiceUnavailable` only if the retry policy has a ``give_up_after_s`` and it
        is spent. The caller must pass the same ``body`` and ``message_id`` for a retried delta.
        ``message_type`` becomes the AMQP type property (the coordinator routes parts by it).
        """
        return self._publish_all([(message_id, lambda: body)], name=message_id, message_type=message_type,
                                 give_up=give_up)

    def _properties(self, message_id: str, message_type: str | None) -> pika.BasicProperties:
        return pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type=CONTENT_TYPE,
            message_id=message_id,
            type=message_type,
            app_id=APP_ID,
            user_id=self.user,
        )

    def _publish_all(
        self,
        messages: Sequence[tuple[str, Callable[[], bytes]]],
        *,
        name: str,
        message_type: str | None,
        give_up: Callable[[], bool],
    ) -> bool:
        """Publish ``messages`` (message id, and how to make its body) until the broker confirmed
        every one, up to ``max_unconfirmed`` awaiting theirs at once; True then, False if
        ``give_up()`` first. ``name`` (the delta's id) is what the log lines say. After trouble of
        any kind, the ones not yet confirmed go again, after the retry policy's backoff.
        """
        confirmed: set[str] = set()
        delays = self.retry.delays()
        troubled: float | None = None  # time.monotonic() of the first failure
        while True:
            if give_up():
                if self._confirms is not None and self._confirms.outstanding:
                    self.close()  # their confirms would come to a later delta's publishes
                return False
            try:
                channel = self._open()
                failure = self._publish_window(
                    channel, [m for m in messages if m[0] not in confirmed], message_type, confirmed, give_up)
                if failure is None and len(confirmed) == len(messages):
                    if troubled is not None:
                        log.warning("delta %s confirmed by the broker after %.0f s of retries", name,
                                    time.monotonic() - troubled)
                    return True
                if failure is not None:
                    raise failure  # a nack or a return: told apart below, like any other trouble
                continue  # gave up between two publishes: said at the top
            except pika.exceptions.UnroutableError:
                why = f"queue {self.queue!r} does not exist yet (is the coordinator running?)"
            except pika.exceptions.NackError:
                why = "the broker refused the delta (queue full?)"
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 403:
                    raise self._forbidden(exc) from exc
                why = _refused_by_broker(exc, self.keys)
                self.close()
            except AMQP_FAILURES as exc:
                refusal = self.contact.refusal(exc)
                if refusal is not None:
                    raise refusal from exc
                why = f"RabbitMQ unavailable ({type(exc).__name__}: {exc})"
                self.close()
                if self._down_since is None:  # said by the warning below; its end by _open
                    self._down_since = time.monotonic()
            if troubled is None:
                log.warning("delta %s not sent: %s; retrying with backoff", name, why)
                troubled = time.monotonic()
            else:
                log.debug("delta %s still not sent: %s", name, why)
            delay = next(delays, None)
            if delay is None:
                raise ServiceUnavailable(f"gave up sending delta {name}: {why}")
            if sleep_interruptibly(delay, give_up):
                return False  # nothing in flight: the window was settled, or the connection closed

    def _publish_window(
        self,
        channel: ConfirmedChannel,
        messages: Sequence[tuple[str, Callable[[], bytes]]],
        message_type: str | None,
        confirmed: set[str],
        give_up: Callable[[], bool],
    ) -> Exception | None:
        """Publish ``messages`` in order, up to ``max_unconfirmed`` awaiting confirms, adding each
        confirmed one's id to ``confirmed``. At the first nack or return no more are sent; those in
        flight are settled, and that first failure is returned (None: none). Connection and
        channel failures raise. Returns with nothing in flight and every outcome taken in."""
        assert not channel.outstanding and not channel.settled(), "a previous upload left confirms behind"
        waiting = deque(messages)
        failure: Exception | None = None
        settled: dict[str, Exception | None] = {}
        while True:
            for message_id, refusal in settled.items():  # acks and nacks came in as parts went out
                if refusal is None:
                    confirmed.add(message_id)
                    self._published = True
                elif failure is None:
                    failure = refusal
            if waiting and failure is None and channel.outstanding < self.max_unconfirmed:
                if give_up():
                    waiting.clear()  # those in flight are still settled: the channel stays usable
                else:
                    message_id, body = waiting.popleft()
                    channel.publish(exchange=self.keys.delta_exchange, routing_key=self.queue, body=body(),
                                    properties=self._properties(message_id, message_type))
                    self._last_io = time.monotonic()
                settled = channel.settled()
                continue
            if not channel.outstanding:
                return failure
            settled = channel.wait()
            self._last_io = time.monotonic()

    def _forbidden(self, exc: pika.exceptions.ChannelClosedByBroker) -> PermanentError:
        """The broker refuses this user the run's exchange (403): after it took deltas from it, a
        revocation; before, credentials for another run."""
        self.close()
        where = f"RabbitMQ at {self.contact.host}:{self.contact.port}"
        why = f"{exc.reply_code} {exc.reply_text}"
        if self._published:
            return Revoked(f"{where} no longer lets user {self.user!r} publish deltas of run "
                           f"{self.keys.run!r} ({why}), after it did earlier: this volunteer's invitation "
                           "was revoked or has expired; ask the run's operator for a new join token")
        return AccessRefused(f"{where} does not let user {self.user!r} publish deltas of run "
                             f"{self.keys.run!r} ({why}): the credentials are for another run; check "
                             "the join token or --amqp")


def _refused_by_broker(exc: pika.exceptions.ChannelClosedByBroker, keys: RunKeys) -> str:
    """Why the broker closed the channel on a publish, in a volunteer's words."""
    if exc.reply_code == 404:
        return f"the run's exchange {keys.delta_exchange!r} does not exist yet (is the coordinator running?)"
    return f"RabbitMQ closed the channel ({exc.reply_code} {exc.reply_text})"


def _check_delta_size(payload: int, codec: str) -> None:
    limit = DEFAULT_DELTA_LIMITS.max_delta_bytes
    if payload + DELTA_ENVELOPE_BYTES > limit:
        raise ConfigError(
            f"a delta of this model is {payload / MiB:.1f} MiB with codec {codec}, over the "
            f"{limit // MiB} MiB limit of a delta; use --codec int8 or int4"
        )
