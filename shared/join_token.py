"""The join token: everything a volunteer's client needs, in one string the operator hands over.

``asyncloco-coordinator invite NAME`` prints one; ``asyncloco-client join TOKEN`` (or
``--token-file``, or ``$ASYNCLOCO_TOKEN``) reads it. It is ``asyncloco1.`` followed by the
URL-safe base64 of a small JSON object::

    {"run": "myrun", "client_id": "alice", "redis": "redis://USER:PW@host:6379/0",
     "amqp": "amqp://USER:PW@host:5672/myrun", "coordinator_key": "<64 hex>"}

It holds the volunteer's own credentials (never the coordinator's), so it is a secret: pass it in
a file or the environment rather than on a command line that ``ps`` shows.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict, dataclass

from shared.errors import ConfigError
from shared.keys import validate_run_name

PREFIX = "asyncloco1."
MAX_TOKEN_CHARS = 8192
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class JoinToken:
    run: str
    client_id: str
    redis: str  # the volunteer's Redis URL, with its own user and password
    amqp: str  # the volunteer's RabbitMQ URL, with its own user and password
    coordinator_key: str  # Ed25519 public key (hex) that signs the run's snapshots and plans

    def __post_init__(self) -> None:
        validate_run_name(self.run)
        if not _CLIENT_ID.match(self.client_id):
            raise ConfigError(f"join token: invalid client id {self.client_id[:70]!r}")
        if not _HEX_KEY.match(self.coordinator_key):
            raise ConfigError("join token: the coordinator key is not 64 hex digits")
        for name, url in (("redis", self.redis), ("amqp", self.amqp)):
            if not isinstance(url, str) or "://" not in url:
                raise ConfigError(f"join token: its {name} URL is malformed")

    def encode(self) -> str:
        raw = json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Parse a token; ConfigError (one clear line, no secret in it) if it is not one."""
        text = text.strip()
        if not text.startswith(PREFIX) or len(text) > MAX_TOKEN_CHARS:
            raise ConfigError(f"not an asyncloco join token (it should start with {PREFIX!r}; "
                              "`asyncloco-coordinator invite NAME` prints one)")
        body = text[len(PREFIX):]
        try:
            obj = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("the join token is damaged (cut or mistyped?)") from exc
        fields = ("run", "client_id", "redis", "amqp", "coordinator_key")
        if not isinstance(obj, dict) or not all(isinstance(obj.get(f), str) for f in fields):
            raise ConfigError("the join token is damaged: fields are missing")
        return cls(**{f: obj[f] for f in fields})
