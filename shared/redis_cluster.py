"""A Redis Cluster of several nodes behind the one Redis client both sides use (docs/SCALING.md).

``--redis redis+cluster://HOST:PORT/0`` (``rediss+cluster://`` for TLS) names any node of the
cluster: the client learns the others and which slots each holds from it, and follows ``MOVED``
redirects (``redis.cluster.RedisCluster``). asyncloco's keys are laid out for it: a snapshot
version's manifest, chunks and patch share one slot (``shared/keys.py``), every other key is used
alone, and the two scripts touch one key each.

``RedisCluster`` asks the cluster for its layout as it is made, so an unreachable cluster would be
an error at start-up; every other Redis client here connects lazily and treats an unreachable
server as an outage to wait out. :class:`LazyCluster` keeps that: the cluster client is made at
the first command, and a cluster that does not answer raises ``redis.ConnectionError``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis
import redis.exceptions
from redis.cluster import RedisCluster

# cluster scheme -> the plain scheme redis-py takes
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# What a cluster's outage looks like besides a connection error: no node answers its layout
# (RedisClusterException, SlotNotCoveredError), a slot without a live primary (CLUSTERDOWN, a
# MasterDownError among them), a slot being moved (TRYAGAIN).
CLUSTER_OUTAGES: tuple[type[Exception], ...] = (redis.exceptions.RedisClusterException,
                                                redis.exceptions.ClusterDownError,
                                                redis.exceptions.TryAgainError)


def is_cluster_url(url: str) -> bool:
    return urlparse(url).scheme in CLUSTER_SCHEMES


def plain_url(url: str) -> str:
    """``url`` with the plain scheme redis-py takes (``redis+cluster://`` -> ``redis://``)."""
    scheme = urlparse(url).scheme
    return CLUSTER_SCHEMES[scheme] + url[len(scheme):] if scheme in CLUSTER_SCHEMES else url


class LazyCluster:
    """A ``RedisCluster`` made at its first command, with ``options`` (socket timeouts, TLS);
    every attribute is the cluster client's. The caller closes it."""

    def __init__(self, url: str, **options: Any) -> None:
        self._url = plain_url(url)
        self.options = options
        self._cluster: RedisCluster | None = None

    @property
    def cluster(self) -> RedisCluster:
        if self._cluster is None:
            try:
                self._cluster = RedisCluster.from_url(self._url, **self.options)
            except CLUSTER_OUTAGES as exc:
                raise redis.exceptions.ConnectionError(
                    f"no node of the Redis cluster answered ({exc})") from exc
        return self._cluster

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> LazyCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def socket_timeout_of(client: Any) -> float | None:
    """The socket timeout (seconds) the Redis client ``client`` was made with, None if none."""
    if isinstance(client, LazyCluster):
        timeout = client.options.get("socket_timeout")
    else:
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return None if timeout is None else float(timeout)


def on_every_node(client: Any, *command: str) -> list[Any]:
    """Run ``command`` on every node of a cluster client (ACL users are each node's own), or once
    on a plain client; the replies, one per node."""
    if isinstance(client, (LazyCluster, RedisCluster)):
        replies = client.execute_command(*command, target_nodes=RedisCluster.ALL_NODES)
        return list(replies.values()) if isinstance(replies, dict) else [replies]
    return [client.execute_command(*command)]
