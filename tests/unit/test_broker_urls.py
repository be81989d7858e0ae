"""Several broker URLs in --amqp (nodes of one RabbitMQ cluster), without servers: how the list is
read and checked, the order open_amqp tries it in, and what a failure of every node means."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from click.testing import CliRunner
from pika.adapters.utils.connection_workflow import AMQPConnectorSocketConnectError

import client.cli
from coordinator.broker_admin import BrokerAdmin
from coordinator.invites import with_credentials
from shared.contact import ServerContact
from shared.errors import AccessRefused, ConfigError, NoService, Revoked
from shared.settings import (
    DEFAULT_AMQP_URL,
    ConnectionSettings,
    NoBrokerAnswered,
    amqp_parameter_list,
    amqp_parameters,
    open_amqp,
)
from tests.private_broker import free_port
from tests.tls_servers import ThrowawayCA

NODE_A = "amqp://alice:secret@node-a.example:5672/run"
NODE_B = "amqp://alice:secret@node-b.example:5673/run"


def _refused() -> Exception:
    """What pika raises when nothing listens: the socket error two wrappers deep."""
    return pika.exceptions.AMQPConnectionError(
        AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "Connection refused")))


def test_one_url_is_read_as_before() -> None:
    settings = ConnectionSettings()
    assert settings.amqp_urls == [DEFAULT_AMQP_URL]
    [params] = amqp_parameter_list(settings)
    default = pika.URLParameters(DEFAULT_AMQP_URL)
    for got in (params, amqp_parameters(settings)):
        assert (got.host, got.port, got.virtual_host, got.credentials, got.ssl_options) == (
            default.host, default.port, default.virtual_host, default.credentials, None)


def test_a_list_is_split_on_commas_in_order_and_a_comma_inside_a_url_stays() -> None:
    settings = ConnectionSettings(amqp_url=f"{NODE_A} , {NODE_B}")
    assert settings.amqp_urls == [NODE_A, NODE_B]
    assert [(p.host, p.port, p.virtual_host) for p in amqp_parameter_list(settings)] == [
        ("node-a.example", 5672, "run"), ("node-b.example", 5673, "run")]
    assert amqp_parameters(settings).host == "node-a.example"  # the first URL's
    # RFC 3986 lets a password hold a bare comma: no scheme follows it, so it is not a separator
    one = ConnectionSettings(amqp_url="amqp://alice:pa,ss@node-a.example/run")
    assert one.amqp_urls == ["amqp://alice:pa,ss@node-a.example/run"]
    assert amqp_parameters(one).credentials.password == "pa,ss"
    # "/%2F" and no path are both the default vhost: the same cluster
    assert len(ConnectionSettings(amqp_url="amqp://u:p@a/%2F,amqp://u:p@b").amqp_urls) == 2


@pytest.mark.parametrize(("url", "fragment"), [
    (f"{NODE_A},redis://node-b.example:6379/0",
     "--amqp (URL 2 of 2) must be an amqp:// URL (amqps:// for TLS), got redis://..."),
    (f"{NODE_A},{NODE_B}?ssl_options=None",
     "--amqp (URL 2 of 2): TLS options do not go in the URL; use amqps:// and --tls-ca"),
    (f"{NODE_A},amqps://alice:secret@node-b.example:5671/run",
     "--amqp: the URLs of the list must all be amqp:// or all amqps://"),
    (f"{NODE_A},amqp://bob:secret@node-b.example/run", "must name the same user and virtual host"),
    (f"{NODE_A},amqp://alice:secret@node-b.example/other", "must name the same user and virtual host"),
])
def test_a_bad_url_in_the_list_is_a_config_error_naming_it(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ConnectionSettings(amqp_url=url)
    assert fragment in str(raised.value) and "secret" not in str(raised.value)


def test_a_malformed_url_in_the_list_is_a_config_error_naming_it() -> None:
    settings = ConnectionSettings(amqp_url=f"{NODE_A},{NODE_B}?heartbeat=often")
    with pytest.raises(ConfigError, match=r"^--amqp \(URL 2 of 2\): bad URL"):
        amqp_parameter_list(settings)


def test_the_client_refuses_a_bad_url_in_the_list_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(client.cli.main, ["join", "--state-dir", str(tmp_path), "--amqp",
                                                  f"{NODE_A},http://node-b.example/"],
                                prog_name="asyncloco-client", env={})
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --amqp (URL 2 of 2) must be an amqp:// URL (amqps:// for TLS), got http://..."]


def test_tls_applies_to_every_url_of_the_list(tmp_path: Path) -> None:
    ca = ThrowawayCA(tmp_path)
    settings = ConnectionSettings(amqp_url="amqps://u:p@node-a.example/%2F,amqps://u:p@node-b.example:5676/%2F",
                                  tls_ca_file=str(ca.ca_cert))
    listed = amqp_parameter_list(settings)
    assert [(p.host, p.port) for p in listed] == [("node-a.example", 5671), ("node-b.example", 5676)]
    for params in listed:
        assert params.ssl_options is not None
        assert params.ssl_options.server_hostname == params.host  # each checked against its own name
        assert params.ssl_options.context.verify_mode is ssl.CERT_REQUIRED


class _FakeConnections:
    """Stands in for pika.BlockingConnection: the hosts in ``answering`` connect, others raise
    ``failure``; ``tried`` records the hosts in the order they were tried."""

    def __init__(self, answering: set[str], failure: Exception) -> None:
        self.answering, self.failure = answering, failure
        self.tried: list[str] = []

    def __call__(self, params: pika.URLParameters) -> Any:
        self.tried.append(params.host)
        if params.host in self.answering:
            return f"connected to {params.host}"
        raise self.failure


def test_open_amqp_takes_the_first_url_that_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = ["node-c.example", "node-a.example", "node-b.example"]
    settings = ConnectionSettings(amqp_url=",".join(f"amqp://u:p@{n}/%2F" for n in nodes))
    fake = _FakeConnections({"node-a.example", "node-b.example"}, _refused())
    monkeypatch.setattr(pika, "BlockingConnection", fake)
    assert open_amqp(settings, amqp_parameter_list(settings)) == "connected to node-a.example"
    assert fake.tried == ["node-c.example", "node-a.example"]
    fake.tried.clear()  # each open goes through the list from its start again
    assert open_amqp(settings, amqp_parameter_list(settings)) == "connected to node-a.example"
    assert fake.tried == ["node-c.example", "node-a.example"]


def test_a_refused_certificate_ends_the_list_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ConnectionSettings(amqp_url="amqps://u:p@node-a.example/%2F,amqps://u:p@node-b.example/%2F")
    bad = ssl.SSLCertVerificationError(1, "certificate verify failed")
    bad.verify_message = "unable to get local issuer certificate"
    fake = _FakeConnections({"node-b.example"}, pika.exceptions.AMQPConnectionError(bad))
    monkeypatch.setattr(pika, "BlockingConnection", fake)
    with pytest.raises(ConfigError, match="RabbitMQ at node-a.example:5671: TLS certificate refused"):
        open_amqp(settings, amqp_parameter_list(settings))
    assert fake.tried == ["node-a.example"]  # a mistake to fix, not a node to skip


def test_when_no_url_answers_each_failure_is_kept_in_order() -> None:
    ports = [free_port(), free_port()]  # nothing listens on either
    settings = ConnectionSettings(amqp_url=",".join(f"amqp://u:p@127.0.0.1:{p}/%2F" for p in ports))
    candidates = amqp_parameter_list(settings)
    for params in candidates:
        params.connection_attempts = 1
    with pytest.raises(NoBrokerAnswered) as raised:
        open_amqp(settings, candidates)
    assert len(raised.value.failures) == 2
    assert all(f"127.0.0.1:{p}" in str(raised.value) for p in ports)
    assert isinstance(raised.value, pika.exceptions.AMQPConnectionError)  # an outage to callers
    refusal = ServerContact(settings.amqp_url, option="--amqp").refusal(raised.value)
    assert isinstance(refusal, NoService) and f"nothing listens at 127.0.0.1:{ports[0]}" in str(refusal)
    # one URL: pika's own exception, as before
    one = ConnectionSettings(amqp_url=f"amqp://u:p@127.0.0.1:{ports[0]}/%2F")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as single:
        open_amqp(one, amqp_parameters(one))
    assert type(single.value) is not NoBrokerAnswered


def _no_node_answered(*failures: BaseException) -> NoBrokerAnswered:
    return NoBrokerAnswered([(pika.URLParameters(u), f) for u, f in zip((NODE_A, NODE_B), failures,
                                                                         strict=True)])


def test_a_list_is_judged_per_url() -> None:
    contact = ServerContact(f"{NODE_A},{NODE_B}", option="--amqp")
    timeout = pika.exceptions.AMQPConnectionError(TimeoutError("timed out"))
    login = pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    # a node that is down beside one that may come back: an outage, whatever the first says
    assert contact.refusal(_no_node_answered(_refused(), timeout)) is None
    # every node a mistake: the first URL's, with its own host and port
    both = contact.refusal(_no_node_answered(unknown, _refused()))
    assert both is not None and "unknown host 'node-a.example'" in str(both)
    # the credentials are the cluster's: one node refusing them is enough, and it is named
    refused = contact.refusal(_no_node_answered(_refused(), login))
    assert isinstance(refused, AccessRefused)
    assert "RabbitMQ at node-b.example:5673 refused user 'alice'" in str(refused)
    contact.answered()
    assert contact.refusal(_no_node_answered(_refused(), _refused())) is None  # it was there: an outage
    assert isinstance(contact.refusal(_no_node_answered(_refused(), login)), Revoked)
    assert "secret" not in str(refused)


def test_an_invitation_to_a_cluster_names_every_node_with_the_volunteers_credentials() -> None:
    nodes = "amqp://admin:pw@10.0.0.1:5672/run,amqp://admin:pw@10.0.0.2:5673/run"
    assert with_credentials(nodes, "alice", "s3cret") == (
        "amqp://alice:s3cret@10.0.0.1:5672/run,amqp://alice:s3cret@10.0.0.2:5673/run")
    admin = BrokerAdmin.for_amqp(nodes)  # the first node's management API, the list's vhost
    assert admin.url == "http://admin:pw@10.0.0.1:15672" and admin.vhost == "run"
