"""Ed25519 signatures: the coordinator signs what it publishes; clients check it with a pinned key.

Redis is shared infrastructure, so a client trusts nothing it reads there for being there: the
snapshot manifest (version, run, run id, task and its settings, inner optimizer, chunk hashes) and
the round plan are stored as a :class:`SignedEnvelope` whose signature a client checks against the
coordinator's public key, which it got from its operator (``--coordinator-key`` or a join token),
never from a server. The chunks need no signature of their own: each chunk's SHA-256 is in the
signed manifest.

The private key is a PKCS8 PEM file, mode 0600, next to the coordinator's checkpoint by default
(``asyncloco-coordinator key`` prints its public half as 64 hex digits). Signatures cover a fixed
context string followed by the body, so a signature made here can never be taken for one over the
same bytes in another protocol that might use the same key.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import PROTOCOL_VERSION
from shared.errors import ConfigError, ProtocolError
from shared.files import write_atomically
from shared.protocol import MiB, check_protocol, require_field, unpack_limited

KEY_FILE_NAME = "signing.key"  # the private key's default name, in the coordinator's checkpoint dir
PUBLIC_KEY_HEX_CHARS = 64  # an Ed25519 public key is 32 bytes
SIGNATURE_BYTES = 64
MAX_KEY_FILE_BYTES = 4096  # a PKCS8 PEM Ed25519 key is 119 bytes
MAX_SIGNED_BODY_BYTES = 8 * MiB  # the largest body an envelope may carry (a manifest's limit)
ENVELOPE_OVERHEAD_BYTES = 256  # what the envelope's own fields add to the body, with room to spare
ENVELOPE_TYPE = "signed"
_CONTEXT = b"asyncloco signed envelope v1\x00"  # prefixed to every signed body (domain separation)
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")


class VerifyKey:
    """The coordinator's public key: checks signatures, knows nothing secret."""

    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.hex = raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        """Parse 64 hex digits (case and surrounding blanks ignored); ConfigError if they are not."""
        value = text.strip().lower() if isinstance(text, str) else ""
        if not _HEX_KEY.fullmatch(value):
            raise ConfigError(
                f"the coordinator key must be {PUBLIC_KEY_HEX_CHARS} hex digits "
                f"(`asyncloco-coordinator key` prints it), got {len(value)} characters"
            )
        try:
            return cls(Ed25519PublicKey.from_public_bytes(bytes.fromhex(value)))
        except ValueError as exc:
            raise ConfigError(f"the coordinator key {value[:8]}… is not an Ed25519 public key") from exc

    @property
    def short(self) -> str:
        """The first 8 hex digits, for messages (``ab12cd34…``)."""
        return self.hex[:8] + "…"

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True if ``signature`` is this key's signature over ``data``."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._public.verify(signature, _CONTEXT + bytes(data))
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.hex == self.hex

    def __hash__(self) -> int:
        return hash(self.hex)

    def __repr__(self) -> str:
        return f"VerifyKey({self.short})"


class SigningKey:
    """The coordinator's private key: signs what it publishes. Never leaves the coordinator."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.verify_key = VerifyKey(private.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key (kept in memory only; tests, or :meth:`load_or_create`)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key in ``path``; if there is no such file, a new key written there with mode 0600.

        A key file that group or others may read is refused (ConfigError): a key that leaked is
        no longer the coordinator's alone, so it is not used until its owner has looked at it.
        """
        path = Path(path).expanduser()
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = cls.generate()
        write_atomically(path, key.pem(), mode=0o600)
        return key

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a PKCS8 PEM Ed25519 private key; ConfigError if it is not one or is not private."""
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"signing key {path} is not a regular file")
            if mode & 0o077:
                raise ConfigError(
                    f"signing key {path} is readable by group or others (mode "
                    f"{stat.S_IMODE(mode):04o}); make it private with: chmod 600 {path}"
                )
            with open(path, "rb") as handle:
                data = handle.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
        if len(data) > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"signing key {path} is too large to be an Ed25519 key file")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"signing key {path} is not an unencrypted PEM private key") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"signing key {path} is not an Ed25519 key")
        return cls(private)

    @property
    def public_hex(self) -> str:
        """The public key as 64 lowercase hex digits: what clients pin."""
        return self.verify_key.hex

    def pem(self) -> bytes:
        """The private key as an unencrypted PKCS8 PEM (what :meth:`load` reads)."""
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature over ``data`` (checked by :meth:`VerifyKey.verify`)."""
        return self._private.sign(_CONTEXT + bytes(data))

    def __repr__(self) -> str:
        return f"SigningKey(public {self.verify_key.short})"


@dataclass(frozen=True)
class SignedEnvelope:
    """A body (an encoded manifest or plan) and the coordinator's signature over it.

    On the wire: msgpack ``{"protocol", "type": "signed", "body": bin, "signature": bin(64)}`` and
    nothing else. :meth:`decode` raises :class:`ProtocolError` with reason ``unsigned`` for bytes
    that are not an envelope at all (a bare manifest, garbage), ``too_large`` for an envelope over
    the limit, ``wrong_schema`` for a malformed one; :meth:`verified_body` raises
    ``bad_signature`` when the signature is not the given key's.
    """

    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, body: bytes, key: SigningKey) -> SignedEnvelope:
        return cls(body=bytes(body), signature=key.sign(body))

    def encode(self) -> bytes:
        return msgpack.packb(
            {"protocol": PROTOCOL_VERSION, "type": ENVELOPE_TYPE, "body": self.body,
             "signature": self.signature},
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes, *, max_body_bytes: int = MAX_SIGNED_BODY_BYTES) -> SignedEnvelope:
        """Parse an envelope (its signature is not checked here: see :meth:`verified_body`)."""
        limit = max_body_bytes + ENVELOPE_OVERHEAD_BYTES
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > limit:
            raise ProtocolError("too_large", f"signed envelope is {len(data)} bytes, limit {limit}")
        try:
            obj: Any = unpack_limited(data, max_bytes=limit, max_items=8, max_str=64)
        except ProtocolError as exc:
            raise ProtocolError("unsigned", f"not a signed envelope ({exc.detail})") from exc
        if not isinstance(obj, dict) or obj.get("type") != ENVELOPE_TYPE:
            raise ProtocolError("unsigned", "not a signed envelope")
        check_protocol(obj)
        if set(obj) != {"protocol", "type", "body", "signature"}:
            raise ProtocolError("wrong_schema", "signed envelope has unexpected fields")
        body = require_field(obj, "body", bytes)
        signature = require_field(obj, "signature", bytes)
        if len(body) > max_body_bytes:
            raise ProtocolError("too_large", f"signed body is {len(body)} bytes, limit {max_body_bytes}")
        if len(signature) != SIGNATURE_BYTES:
            raise ProtocolError("wrong_schema", f"signature is {len(signature)} bytes, not {SIGNATURE_BYTES}")
        return cls(body=body, signature=signature)

    def verified_body(self, key: VerifyKey | None) -> bytes:
        """The body, if ``key`` signed it (``bad_signature`` otherwise). ``key`` None: the reader
        is the coordinator itself, reading back what it wrote, and checks nothing."""
        if key is not None and not key.verify(self.body, self.signature):
            raise ProtocolError("bad_signature", f"not signed by the coordinator key {key.short}")
        return self.body


def open_signed(data: bytes, key: VerifyKey | None, *, max_body_bytes: int = MAX_SIGNED_BODY_BYTES) -> bytes:
    """Decode an envelope and return its body once ``key`` (if given) has verified it."""
    return SignedEnvelope.decode(data, max_body_bytes=max_body_bytes).verified_body(key)


def seal(body: bytes, key: SigningKey) -> bytes:
    """The encoded envelope of ``body`` signed by ``key``."""
    return SignedEnvelope.sign(body, key).encode()
