"""One coordinator per run: a lease key in Redis with a TTL, refreshed while serving.

A coordinator that was killed leaves its lease behind; a new one on the same host takes it over
at once when the holder's pid is gone (or a zombie), otherwise it waits for the TTL to run out.
A lease key that vanished while we held it (Redis restarted without persistence, or was flushed)
is taken back on the next refresh, atomically and only if nobody else took it in the meantime.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import redis

from shared.errors import RunTaken
from shared.processes import pid_alive
from shared.settings import redis_bytes

log = logging.getLogger(__name__)

# Extend the lease if it is ours, take it back (SET NX semantics) if it is missing; 0 if another
# holder's value is there. Returns 1 (extended), 2 (re-acquired) or 0 (lost).
_REFRESH = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 2
end
return 0
"""


def holder_dead(holder: str, *, host: str | None = None) -> bool:
    """True if lease value ``holder`` (``host:pid:nonce``) names a process on this host that is gone.

    Only a holder on this host (``host``, default this machine's name) can be checked; one
    elsewhere is never known dead (its lease runs out with the TTL). A zombie counts as dead.
    """
    holder_host, _, rest = holder.partition(":")
    pid_s = rest.partition(":")[0]
    return holder_host == (host or socket.gethostname()) and pid_s.isdigit() and not pid_alive(int(pid_s))


def live_holder(client: redis.Redis, key: str) -> str | None:
    """The value of the lease under ``key`` unless it is absent or its holder is known dead."""
    raw = redis_bytes(client.get(key))
    if raw is None:
        return None
    holder = raw.decode(errors="replace")
    return None if holder_dead(holder) else holder


class CoordinatorLease:
    """The run's lease, held as ``host:pid:nonce`` under ``key`` with a ``ttl_s`` expiry."""

    def __init__(self, client: redis.Redis, key: str, *, ttl_s: int = 15) -> None:
        self.redis = client
        self.key = key
        self.ttl_s = ttl_s
        self.host = socket.gethostname()
        self.value = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._refresh = client.register_script(_REFRESH)
        self.refreshed_at = 0.0  # time.monotonic() of the last refresh that found the lease ours

    def acquire(self, *, wait_s: float | None = None) -> None:
        """Take the lease, waiting up to ``wait_s`` (default: the TTL) for a dead holder's to expire."""
        deadline = time.monotonic() + (self.ttl_s + 1 if wait_s is None else wait_s)
        told = False
        while True:
            if self.redis.set(self.key, self.value, nx=True, ex=self.ttl_s):
                self.refreshed_at = time.monotonic()
                return
            holder = redis_bytes(self.redis.get(self.key))
            holder_s = holder.decode(errors="replace") if holder else ""
            if holder_s and holder_dead(holder_s, host=self.host):
                log.info("taking over the lease of dead coordinator %s", holder_s)
                self.redis.set(self.key, self.value, ex=self.ttl_s)
                self.refreshed_at = time.monotonic()
                return
            if time.monotonic() >= deadline:
                raise RunTaken(
                    f"another coordinator ({holder_s}) is serving this run; stop it first "
                    f"(or wait {self.ttl_s} s if it was killed on another machine)"
                )
            if not told:
                log.info("waiting for coordinator %s to release the run (lease %d s)", holder_s, self.ttl_s)
                told = True
            time.sleep(0.5)

    def refresh(self) -> bool:
        """Extend the lease; take it back if its key vanished; False only if another holds it.

        One atomic script: a refresh can never overwrite another coordinator's lease, even one
        that took the key between our read and our write.
        """
        result = int(self._refresh(keys=[self.key], args=[self.value, self.ttl_s]))
        if result == 2:
            log.warning("the lease key %s had vanished (Redis restarted or flushed, or this process "
                        "was paused longer than the lease's %d s); took it back", self.key, self.ttl_s)
        if result:
            self.refreshed_at = time.monotonic()
        return result != 0

    def stale(self) -> bool:
        """True when the last good refresh is more than a third of the TTL ago (e.g. after a pause)."""
        return time.monotonic() - self.refreshed_at > self.ttl_s / 3

    def release(self) -> None:
        holder = redis_bytes(self.redis.get(self.key))
        if holder is not None and holder.decode(errors="replace") == self.value:
            self.redis.delete(self.key)
