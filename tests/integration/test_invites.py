"""Invited volunteers on the real servers: they can train, and nothing else.

A volunteer's Redis user reads the run's snapshot, plan and status keys and nothing more; its
broker user publishes to the run's delta exchange and nothing more; RabbitMQ's validated user_id
tells the coordinator who sent a delta, so a volunteer can neither send under another's name nor
hide behind the shared guest account; `revoke` cuts it off at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
import redis

from coordinator.broker_admin import restore_redis_users
from coordinator.consumer import QueueConfig, declare_queues
from coordinator.identity import AuthMode
from coordinator.invites import Servers, invite, revoke
from coordinator.service import Coordinator
from coordinator.volunteers import VolunteerBook
from harness.faults import status
from harness.processes import AMQP_URL, REDIS_URL, wait_for
from shared.join_token import JoinToken
from shared.keys import RunKeys
from tests.integration.test_coordinator_intake import _good_delta
from tests.services import serving, small_config

pytestmark = pytest.mark.integration

SERVERS = Servers(redis_url=REDIS_URL, amqp_url=AMQP_URL, public_redis_url=REDIS_URL,
                  public_amqp_url=AMQP_URL)
KEY = "cd" * 32


@pytest.fixture
def book(tmp_path: Path) -> VolunteerBook:
    return VolunteerBook.open(tmp_path / "ckpt")


@pytest.fixture
def invited(run_name: str, book: VolunteerBook, redis_client: redis.Redis) -> Iterator[dict[str, JoinToken]]:
    """alice and bob, invited; both revoked (users deleted) afterwards, whatever the test did."""
    tokens = {name: invite(run=run_name, name=name, servers=SERVERS, redis_client=redis_client, book=book,
                           coordinator_key=KEY)
              for name in ("alice", "bob")}
    try:
        yield tokens
    finally:
        for name, volunteer in book.volunteers.items():
            if volunteer.revoked_at is None:
                revoke(run=run_name, name=name, servers=SERVERS, redis_client=redis_client, book=book)


def _channel_error(connection: pika.BlockingConnection, action: object) -> int:
    """Run ``action(channel)`` on a fresh channel; return the broker's reply code (0: allowed)."""
    channel = connection.channel()
    try:
        action(channel)  # type: ignore[operator]
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    channel.close()
    return 0


def test_a_volunteers_redis_user_reads_the_snapshot_and_nothing_else(
    run_name: str, invited: dict[str, JoinToken], redis_client: redis.Redis
) -> None:
    keys, other = RunKeys(run_name), RunKeys(f"{run_name}-other")
    for key in (keys.current, keys.plan, keys.status, keys.manifest(3), keys.chunk(3, 0), other.current):
        redis_client.set(key, b"x")
    redis_client.xadd(keys.verdicts("alice"), {b"v": b"x"})
    redis_client.xadd(other.verdicts("alice"), {b"v": b"x"})
    redis_client.set(keys.coordinator_lease, b"host:1:abc", ex=30)
    volunteer = redis.Redis.from_url(invited["alice"].redis)
    try:
        assert volunteer.ping()
        assert volunteer.get(keys.current) == b"x" and volunteer.exists(keys.plan) == 1
        assert volunteer.mget([keys.manifest(3), keys.chunk(3, 0), keys.status]) == [b"x"] * 3
        (_, [(_, fields)]), = volunteer.xread({keys.verdicts("alice"): "0-0"}, block=100)
        assert fields == {b"v": b"x"}  # the verdicts on its deltas, read by a blocking XREAD
        refused = [
            lambda: volunteer.set(keys.current, b"999"),  # point everyone at a forged model
            lambda: volunteer.set(keys.manifest(3), b"forged"),
            lambda: volunteer.delete(keys.chunk(3, 0)),
            lambda: volunteer.set(keys.coordinator_lease, b"mine"),  # stop the coordinator
            lambda: volunteer.get(keys.coordinator_lease),
            lambda: volunteer.get(other.current),  # another run's keys
            lambda: volunteer.xread({other.verdicts("alice"): "0-0"}),
            lambda: volunteer.xadd(keys.verdicts("alice"), {b"v": b"forged"}),  # its own verdicts
            lambda: volunteer.xtrim(keys.verdicts("alice"), maxlen=0),
            lambda: volunteer.flushall(),
            lambda: volunteer.config_get("*"),
            lambda: volunteer.keys("*"),
            lambda: volunteer.execute_command("ACL", "LIST"),
            lambda: volunteer.execute_command("ACL", "SETUSER", "evil", "on", ">x", "+@all", "~*"),
            lambda: volunteer.publish("chan", "x"),
            lambda: volunteer.eval("return 1", 0),
        ]
        for attempt in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        assert redis_client.get(keys.current) == b"x"
        assert redis_client.get(keys.coordinator_lease) == b"host:1:abc"
    finally:
        volunteer.close()
        redis_client.delete(other.current, other.verdicts("alice"))


def test_a_volunteers_broker_user_publishes_deltas_and_nothing_else(
    run_name: str, invited: dict[str, JoinToken]
) -> None:
    keys = RunKeys(run_name)
    admin = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    volunteer = pika.BlockingConnection(pika.URLParameters(invited["alice"].amqp))
    try:
        declare_queues(admin.channel(), keys, QueueConfig())
        user = pika.URLParameters(invited["alice"].amqp).credentials.username

        def publish(exchange: str, user_id: str | None) -> object:
            def action(channel: object) -> None:
                channel.confirm_delivery()  # type: ignore[attr-defined]
                channel.basic_publish(exchange, keys.delta_queue, b"delta",  # type: ignore[attr-defined]
                                      pika.BasicProperties(user_id=user_id), mandatory=True)
            return action

        assert _channel_error(volunteer, publish(keys.delta_exchange, user)) == 0
        assert _channel_error(volunteer, publish("", user)) == 403  # straight into any queue
        assert _channel_error(volunteer, publish(keys.dead_letter_exchange, user)) == 403
        forged_sender = publish(keys.delta_exchange, "asyncloco.x.bob")
        assert _channel_error(volunteer, forged_sender) == 406
        assert _channel_error(volunteer, lambda ch: ch.basic_get(keys.delta_queue)) == 403  # others' deltas
        assert _channel_error(volunteer, lambda ch: ch.queue_purge(keys.delta_queue)) == 403
        assert _channel_error(volunteer, lambda ch: ch.queue_delete(keys.delta_queue)) == 403
        assert _channel_error(volunteer, lambda ch: ch.queue_declare("mine")) == 403
        assert _channel_error(volunteer, lambda ch: ch.exchange_declare("mine")) == 403
        depth = admin.channel().queue_declare(keys.delta_queue, passive=True).method.message_count
        assert depth == 1  # the one allowed publish, and it is still there
    finally:
        volunteer.close()
        admin.close()


@pytest.fixture
def invite_coordinator(run_name: str, tmp_path: Path) -> Iterator[Coordinator]:
    config = small_config(run_name, tmp_path, auth=AuthMode.INVITE)
    with serving(config) as coord:
        yield coord


def _publish_as(token: JoinToken | None, run: str, bodies: list[bytes]) -> None:
    """Publish as the token's volunteer (its own user_id), or as guest (the coordinator's account)."""
    params = pika.URLParameters(token.amqp if token else AMQP_URL)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(RunKeys(run).delta_exchange, RunKeys(run).delta_queue, body,
                                  pika.BasicProperties(delivery_mode=2, user_id=params.credentials.username),
                                  mandatory=True)
    finally:
        connection.close()


def test_deltas_are_credited_to_their_sender_only_and_revoke_cuts_it_off(
    run_name: str, invite_coordinator: Coordinator, invited: dict[str, JoinToken],
    book: VolunteerBook, redis_client: redis.Redis
) -> None:
    coord = invite_coordinator
    alice = invited["alice"]
    bodies = [_good_delta(coord, client_id="alice", seq=0),
              _good_delta(coord, client_id="bob", seq=0),  # alice's credentials, bob's name
              _good_delta(coord, client_id="alice", seq=1)]
    _publish_as(alice, run_name, bodies[:2])
    _publish_as(None, run_name, [bodies[2]])  # the coordinator's own guest account is no volunteer
    wait_for(lambda: status(run_name).get("deltas", {}).get("rejected") == 2
             and status(run_name)["deltas"]["applied"] == 1, 30, "one applied, two rejected")
    deltas = status(run_name)["deltas"]
    assert deltas["rejected_by_reason"] == {"identity_mismatch": 1, "unknown_volunteer": 1}
    # bob's sequence window was not touched by the forgery: his own seq 0 is still his to send
    _publish_as(invited["bob"], run_name, [_good_delta(coord, client_id="bob", seq=0)])
    wait_for(lambda: status(run_name)["deltas"]["applied"] == 2, 30, "bob's own delta applied")

    # Redis forgets bob's user (a restart without an ACL file): the serving coordinator gives it back
    redis_client.execute_command("ACL", "DELUSER", book.volunteers["bob"].user)
    coord._next_user_check = 0.0  # its next look, at once instead of within 30 s

    def bob_reads() -> bool:
        try:
            with redis.Redis.from_url(invited["bob"].redis) as bob:
                return bool(bob.ping())
        except redis.exceptions.AuthenticationError:
            return False

    wait_for(bob_reads, 10, "bob's Redis user created again by the coordinator")

    # revoke: alice's open connection is closed at once and she cannot come back
    listening = pika.BlockingConnection(pika.URLParameters(alice.amqp))
    started = time.monotonic()
    revoke(run=run_name, name="alice", servers=SERVERS, redis_client=redis_client, book=book)
    with pytest.raises(pika.exceptions.AMQPError):
        for _ in range(50):
            listening.process_data_events(time_limit=0.1)
    assert time.monotonic() - started < 10
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(alice.amqp))
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(alice.redis).ping()
    # and the serving coordinator has re-read the book: her deltas still queued would be `revoked`
    wait_for(lambda: coord.run.volunteers is not None
             and coord.run.volunteers.volunteers["alice"].revoked_at is not None, 10, "the book re-read")


def test_a_redis_that_lost_its_users_gets_the_invited_ones_back_from_their_hashes(
    run_name: str, invited: dict[str, JoinToken], book: VolunteerBook, redis_client: redis.Redis
) -> None:
    keys = RunKeys(run_name)
    redis_client.set(keys.current, b"7")
    assert "alice" in book.volunteers and book.volunteers["alice"].redis_password_sha256
    assert invited["alice"].redis.split("@")[0].split(":")[-1] not in (book.path.read_text())  # no password
    revoke(run=run_name, name="bob", servers=SERVERS, redis_client=redis_client, book=book)
    for volunteer in book.volunteers.values():  # what a Redis restart without an ACL file does
        redis_client.execute_command("ACL", "DELUSER", volunteer.user)
    restored = restore_redis_users(redis_client, keys, book.volunteers.values(), time.time())
    assert restored == ["alice"]  # bob was revoked: not given back
    alice = redis.Redis.from_url(invited["alice"].redis)
    try:
        assert alice.get(keys.current) == b"7"  # the token's password works again, same rights
        with pytest.raises(redis.exceptions.NoPermissionError):
            alice.set(keys.current, b"999")
    finally:
        alice.close()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(invited["bob"].redis).ping()
    assert restore_redis_users(redis_client, keys, book.volunteers.values(), time.time()) == []
