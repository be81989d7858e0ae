"""The AMQP side of the intake: one thread owns the pika connection; the service owns the work.

pika is not thread-safe, so this thread does all I/O: it declares the queues, receives deliveries
into an in-process inbox (bounded by the prefetch), and settles them when the service asks, through
``add_callback_threadsafe``. The service applies deltas on its own thread and settles a delivery
only after a commit includes it. Every reconnect starts a new *generation*: deliveries of an older
generation can no longer be acked (their tags died with the channel); the broker redelivers them
and the (client id, seq) de-duplication makes that harmless. A rejected delivery is acked only
once the broker confirmed its dead letter (publisher confirms on the consuming channel).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from coordinator.outcome import Outcome
from shared.contact import ServerContact
from shared.errors import AccessRefused, ConfigError
from shared.keys import MAX_DELTA_QUEUES, RunKeys
from shared.settings import ConnectionSettings, RetryPolicy, amqp_parameter_list, open_amqp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueConfig:
    """Broker-side settings of the delta queue.

    ``max_queue_bytes``: when this much is waiting, the broker refuses new publishes
    (``reject-publish``) and clients back off and retry: an overloaded coordinator slows clients
    down instead of dropping their work. ``delivery_limit``: a message redelivered this often is
    dead-lettered (a message that keeps crashing consumers must not loop forever). ``count``:
    delta queues (``--delta-queues``), each client sending to one of them
    (:meth:`shared.keys.RunKeys.delta_queue_for`) and the coordinator consuming them all; a quorum
    queue's publishes all go through its one Raft leader, and the queues after the first place
    theirs on the cluster's nodes in turn (``x-queue-leader-locator: balanced``). Each holds up to
    ``max_queue_bytes`` and is consumed with ``prefetch`` / ``count`` (rounded up) unacked.
    """

    prefetch: int = 64
    max_queue_bytes: int = 1024 * 1024 * 1024
    delivery_limit: int = 100
    dead_letter_max_bytes: int = 256 * 1024 * 1024
    count: int = 1

    def __post_init__(self) -> None:
        if self.prefetch < 1 or self.max_queue_bytes < 1 or self.delivery_limit < 1:
            raise ConfigError("prefetch, max_queue_bytes and delivery_limit must be >= 1")
        if not 1 <= self.count <= MAX_DELTA_QUEUES:
            raise ConfigError(f"delta queues: 1 to {MAX_DELTA_QUEUES}")

    @property
    def prefetch_per_queue(self) -> int:
        return -(-self.prefetch // self.count)


def delta_queue_arguments(keys: RunKeys, config: QueueConfig, index: int = 0) -> dict[str, Any]:
    """Delta queue ``index``: a quorum queue; a message over the delivery limit is dead-lettered
    *at least once* (the broker keeps it until the dead-letter queue confirms it; needs
    reject-publish, which we want for backpressure anyway). The first queue keeps the arguments it
    always had (a queue redeclared with other ones is refused); the others spread their leaders."""
    spread = {"x-queue-leader-locator": "balanced"} if index else {}
    return {
        "x-queue-type": "quorum",
        **spread,
        "x-delivery-limit": config.delivery_limit,
        "x-max-length-bytes": config.max_queue_bytes,
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": keys.dead_letter_exchange,
        "x-dead-letter-routing-key": keys.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
    }


def dead_letter_queue_arguments(config: QueueConfig) -> dict[str, Any]:
    """A quorum queue too, so that it outlives any one node of a cluster (a classic queue lives on
    the node that declared it alone, and a coordinator that reconnects through another node would
    find it gone); over ``dead_letter_max_bytes`` the oldest letters are dropped (drop-head)."""
    return {
        "x-queue-type": "quorum",
        "x-max-length-bytes": config.dead_letter_max_bytes,
        "x-overflow": "drop-head",
    }


def declare_queues(channel: Any, keys: RunKeys, config: QueueConfig, *, keep_existing: bool = False) -> Any:
    """Declare the dead-letter exchange and queue, the delta queue and the exchange clients publish
    to, bound to it (idempotent); return the channel to go on with.

    ``keep_existing``: a queue that exists with other arguments than these (another
    --max-queue-bytes, or declared by an older version: a classic dead-letter queue) is used as
    it is, with a warning, rather than refuse to serve the run; the broker's 406 closed the
    channel, so a new one is returned. Without it, the 406 raises.
    """
    channel.exchange_declare(keys.dead_letter_exchange, exchange_type="direct", durable=True)
    channel = _declare_queue(channel, keys.dead_letter_queue, dead_letter_queue_arguments(config),
                             keep_existing=keep_existing)
    channel.queue_bind(keys.dead_letter_queue, keys.dead_letter_exchange, keys.dead_letter_queue)
    channel.exchange_declare(keys.delta_exchange, exchange_type="direct", durable=True)
    for index, name in enumerate(keys.delta_queues(config.count)):
        channel = _declare_queue(channel, name, delta_queue_arguments(keys, config, index),
                                 keep_existing=keep_existing)
        channel.queue_bind(name, keys.delta_exchange, name)  # the routing key is the queue's name
    return channel


def _declare_queue(channel: Any, name: str, arguments: dict[str, Any], *, keep_existing: bool) -> Any:
    """Declare durable queue ``name`` with ``arguments``; see :func:`declare_queues` for a queue
    that exists with others. Returns the channel to go on with."""
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
        return channel
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406 or not keep_existing:
            raise
        log.warning("queue %s exists with other arguments than this coordinator's (%s); using it as "
                    "it is (delete it when empty to apply the new ones)", name, exc.reply_text)
    channel = channel.connection.channel()
    channel.queue_declare(name, passive=True)
    return channel


@dataclass(frozen=True)
class Delivery:
    """One message from the queue; ``message_type`` is its AMQP type property (parts say so).

    ``sender`` is the message's ``user_id`` property: RabbitMQ refuses a publish whose user_id is
    not the publishing connection's own user, so it names who sent it ("" when unset).

    A delta put together from parts is handled as a delivery of generation -1 (nothing to ack)
    whose ``spool_key`` names its spool entry, removed once a commit settles it.
    """

    generation: int
    tag: int
    body: bytes
    redelivered: bool
    message_type: str = ""
    spool_key: str = ""
    sender: str = ""

    @classmethod
    def from_spool(cls, key: str) -> Delivery:
        return cls(generation=-1, tag=-1, body=b"", redelivered=False, spool_key=key)


class DeltaConsumer(threading.Thread):
    """Receives deltas into ``inbox`` and settles them on request; reconnects by itself."""

    def __init__(
        self,
        *,
        connection: ConnectionSettings,
        keys: RunKeys,
        config: QueueConfig,
        retry: RetryPolicy,
        inbox: queue.Queue[Delivery],
    ) -> None:
        super().__init__(name="asyncloco-consumer", daemon=True)
        self.settings = connection  # the broker's URL, TLS CA and heartbeat
        self.keys = keys
        self.config = config
        self.retry = retry
        self.inbox = inbox
        self.generation = 0
        self.connected = threading.Event()
        self.fatal: BaseException | None = None  # set when retrying cannot help
        # Whether the broker ever let us in: before it did, a refusal is a permanent mistake.
        self.contact = ServerContact(connection.amqp_url, option="--amqp", token=False)
        self.queue_depth: int | None = None
        self.dead_letters: int | None = None
        self.delivered: Counter[str] = Counter()  # deliveries received, by routing key (its queue)
        self.reconnects = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        delays = self.retry.delays()
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                self._consume()
            except ConfigError as exc:  # a refused TLS certificate, a plain URL to a TLS port
                self.fatal = exc
                self.connected.clear()
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code in (403, 406):  # access refused, precondition failed: fatal
                    refused = f"RabbitMQ refused the run's queues: {exc.reply_text}"
                    self.fatal = AccessRefused(refused) if exc.reply_code == 403 else ConfigError(refused)
                    self.connected.clear()
                    return
                log.warning("RabbitMQ closed the channel (%s); reconnecting", exc)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # Wrong credentials, an unknown host, nothing listening: at first contact these
                # are mistakes in --amqp that no retry cures; after it, outages.
                refusal = None if self.contact.ever_answered else self.contact.refusal(exc)
                if refusal is not None:
                    self.fatal = refusal
                    self.connected.clear()
                    return
                log.warning("RabbitMQ connection lost (%s); reconnecting", str(exc) or type(exc).__name__)
            finally:
                with self._lock:
                    self._connection = None
                    self._channel = None
                    self.generation += 1
                self.connected.clear()
            if self._stop_event.is_set():
                break
            self.reconnects += 1
            if time.monotonic() - started > 30:
                delays = self.retry.delays()  # it had been healthy: start the backoff afresh
            self._stop_event.wait(next(delays, self.retry.max_delay_s))

    def _consume(self) -> None:
        # every URL, in order, on every reconnect: after its node dies the coordinator goes on
        # through another node of the cluster
        candidates = amqp_parameter_list(self.settings)
        for params in candidates:
            params.heartbeat = self.settings.heartbeat_s
            params.client_properties = {"connection_name": f"asyncloco-coordinator:{self.keys.run}"}
        connection = open_amqp(self.settings, candidates)
        self.contact.answered()
        try:
            # A queue that exists with other arguments (another --max-queue-bytes, or declared by
            # an older version) is used as it is rather than refuse to serve the run.
            channel = declare_queues(connection.channel(), self.keys, self.config, keep_existing=True)
            # per consumer (quorum queues have no channel-wide prefetch): the total stays prefetch
            channel.basic_qos(prefetch_count=self.config.prefetch_per_queue)
            channel.confirm_delivery()  # a dead letter is confirmed before its delivery is acked
            generation = self.generation
            names = self.keys.delta_queues(self.config.count)
            for name in names:
                channel.basic_consume(
                    name, on_message_callback=functools.partial(self._on_message, generation), auto_ack=False)
            with self._lock:
                self._connection, self._channel = connection, channel
            self.connected.set()
            log.info("consuming %s (prefetch %d each)", ", ".join(names), self.config.prefetch_per_queue)
            next_depth = 0.0
            while not self._stop_event.is_set():
                connection.process_data_events(time_limit=0.2)
                if time.monotonic() >= next_depth:
                    self._refresh_depths(channel)
                    next_depth = time.monotonic() + 2.0
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _refresh_depths(self, channel: Any) -> None:
        self.queue_depth = sum(channel.queue_declare(name, passive=True).method.message_count
                               for name in self.keys.delta_queues(self.config.count))
        self.dead_letters = channel.queue_declare(
            self.keys.dead_letter_queue, passive=True
        ).method.message_count

    def _on_message(self, generation: int, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self.delivered[str(method.routing_key)] += 1
        self.inbox.put(Delivery(generation, method.delivery_tag, body, bool(method.redelivered),
                                message_type=props.type or "", sender=props.user_id or ""))

    def settle(self, items: list[tuple[Delivery, Outcome]]) -> int:
        """Ack applied, duplicate and spooled deliveries; dead-letter rejected ones with their reason
        (each acked only after the broker confirmed its dead letter).

        Runs on the I/O thread. Deliveries of a dead generation are skipped (the broker will
        redeliver them). Returns how many were handed to the I/O thread.
        """
        with self._lock:
            connection, channel, generation = self._connection, self._channel, self.generation
        live = [(d, o) for d, o in items if d.generation == generation]
        if connection is None or not live:
            return 0
        try:
            connection.add_callback_threadsafe(
                functools.partial(self._settle_now, channel, generation, live)
            )
        except pika.exceptions.AMQPError:
            return 0
        return len(live)

    def _settle_now(self, channel: Any, generation: int, items: list[tuple[Delivery, Outcome]]) -> None:
        if generation != self.generation or not channel.is_open:
            return
        for delivery, outcome in items:
            if not outcome.acked:
                headers = {
                    "x-asyncloco-reason": outcome.reason,
                    "x-asyncloco-detail": outcome.detail[:500],
                    "x-asyncloco-delta-id": outcome.delta_id,
                }
                try:
                    # Confirm mode and mandatory: this returns once the dead-letter queue holds the
                    # message (persisted), and raises if the broker refused it or had no such queue.
                    channel.basic_publish(
                        "", self.keys.dead_letter_queue, delivery.body,
                        pika.BasicProperties(delivery_mode=2, headers=headers), mandatory=True,
                    )
                except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                    # Unacked, the delivery comes back after the reconnect, which also declares
                    # the dead-letter queue again; the intake rejects it once more.
                    log.warning("RabbitMQ did not take the dead letter of %s (%s); leaving the "
                                "delivery unacked and reconnecting", outcome.delta_id or "a delivery",
                                type(exc).__name__)
                    raise
            channel.basic_ack(delivery.tag)
