"""Signatures without servers: keys, the signed envelope, the key file, the client's pinned key and
its task allow-list."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import msgpack
import pytest
import torch
from click.testing import CliRunner
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import client.cli as client_cli
from client.config import NO_COORDINATOR_KEY, ClientConfig
from client.replica import Replica
from shared import PROTOCOL_VERSION
from shared.errors import ConfigError, ProtocolError
from shared.files import write_atomically
from shared.signing import SignedEnvelope, SigningKey, VerifyKey, open_signed, seal
from shared.snapshot import Snapshot
from shared.snapshot_layout import SnapshotManifest

KEY = SigningKey.generate()
OTHER = SigningKey.generate()


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# --- keys ------------------------------------------------------------------------------------------


def test_a_signature_verifies_under_its_key_only() -> None:
    data = b"manifest bytes"
    signature = KEY.sign(data)
    assert len(signature) == 64 and len(KEY.public_hex) == 64
    assert KEY.verify_key.verify(data, signature)
    assert VerifyKey.from_hex(KEY.public_hex).verify(data, signature)  # the pinned copy agrees
    assert not OTHER.verify_key.verify(data, signature)
    assert not KEY.verify_key.verify(data, OTHER.sign(data))


@pytest.mark.parametrize("index", [0, 5, 13])
def test_a_flipped_bit_in_the_data_or_the_signature_is_refused(index: int) -> None:
    data = b"manifest bytes"
    signature = KEY.sign(data)
    assert not KEY.verify_key.verify(flip_bit(data, index), signature)
    assert not KEY.verify_key.verify(data, flip_bit(signature, index))
    assert not KEY.verify_key.verify(data, signature[:-1])  # a short signature is simply false


def test_the_public_key_parses_from_hex_in_any_case() -> None:
    assert VerifyKey.from_hex(KEY.public_hex.upper()) == KEY.verify_key
    assert VerifyKey.from_hex(f"  {KEY.public_hex}\n").hex == KEY.public_hex


@pytest.mark.parametrize("text", ["", "ab", "zz" * 32, "a" * 63, "a" * 65, "0x" + "a" * 62])
def test_a_malformed_public_key_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="64 hex digits"):
        VerifyKey.from_hex(text)


def test_a_signature_is_not_one_over_the_bare_body() -> None:
    """Signatures cover a context string too: a key used elsewhere cannot be made to sign ours."""
    data = b"plan"
    raw = Ed25519PublicKey.from_public_bytes(bytes.fromhex(KEY.public_hex))
    with pytest.raises(InvalidSignature):
        raw.verify(KEY.sign(data), data)


# --- the key file ----------------------------------------------------------------------------------


def test_load_or_create_writes_a_private_key_once_and_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "signing.key"
    created = SigningKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert SigningKey.load_or_create(path).public_hex == created.public_hex
    assert not list(path.parent.glob(".*.tmp"))  # written atomically: no temporary left behind


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signing.key"
    SigningKey.load_or_create(path)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"readable by group or others \\(mode {mode:04o}\\).*chmod 600"):
        SigningKey.load_or_create(path)


def test_a_key_file_that_is_not_an_ed25519_pem_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    write_atomically(garbage, b"not a key", mode=0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        SigningKey.load_or_create(garbage)
    ec_key = tmp_path / "ec.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomically(ec_key, pem, mode=0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        SigningKey.load_or_create(ec_key)


def test_write_atomically_sets_the_mode_even_over_a_leftover_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    leftover = tmp_path / f".secret.{os.getpid()}.tmp"
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    write_atomically(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600


# --- the envelope ----------------------------------------------------------------------------------


def test_an_envelope_round_trips_and_gives_its_body_to_the_right_key_only() -> None:
    body = b"\x01\x02 a manifest"
    data = seal(body, KEY)
    assert SignedEnvelope.decode(data) == SignedEnvelope(body, KEY.sign(body))
    assert open_signed(data, KEY.verify_key) == body
    assert open_signed(data, None) == body  # the coordinator reading back its own writes
    with pytest.raises(ProtocolError) as refused:
        open_signed(data, OTHER.verify_key)
    assert refused.value.reason == "bad_signature" and OTHER.verify_key.short in str(refused.value)


def test_a_flipped_bit_anywhere_in_an_envelope_is_never_accepted() -> None:
    body = b"chunk hashes and a task name"
    data = seal(body, KEY)
    for index in range(len(data)):
        try:
            opened = open_signed(flip_bit(data, index), KEY.verify_key)
        except ProtocolError:
            continue
        raise AssertionError(f"a flipped bit at byte {index} was accepted: {opened!r}")


def _packed(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (SnapshotManifest("r", "rid", 0, (), 4, ()).encode(), "unsigned"),  # a bare manifest
        (b"\xc1garbage", "unsigned"),
        (b"", "unsigned"),
        (_packed(protocol=PROTOCOL_VERSION, type="plan", body=b"x", signature=b"s" * 64), "unsigned"),
        (_packed(protocol=PROTOCOL_VERSION, type="signed", body=b"x"), "wrong_schema"),
        (_packed(protocol=PROTOCOL_VERSION, type="signed", body=b"x", signature=b"s" * 63), "wrong_schema"),
        (_packed(protocol=PROTOCOL_VERSION, type="signed", body="x", signature=b"s" * 64), "wrong_schema"),
        (_packed(protocol=PROTOCOL_VERSION, type="signed", body=b"x", signature=b"s" * 64, extra=1),
         "wrong_schema"),
        (_packed(protocol=PROTOCOL_VERSION + 1, type="signed", body=b"x", signature=b"s" * 64),
         "protocol_version"),
    ],
)
def test_what_is_not_a_well_formed_envelope_is_refused_with_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        SignedEnvelope.decode(data)
    assert refused.value.reason == reason


def test_an_envelope_over_its_limit_is_refused_before_it_is_unpacked() -> None:
    data = seal(b"x" * 2000, KEY)
    assert open_signed(data, KEY.verify_key, max_body_bytes=2000) == b"x" * 2000
    with pytest.raises(ProtocolError) as refused:
        open_signed(data, KEY.verify_key, max_body_bytes=1000)
    assert refused.value.reason == "too_large"
    with pytest.raises(ProtocolError) as too_big:
        open_signed(seal(b"x" * 1100, KEY), KEY.verify_key, max_body_bytes=1000)  # within the slack
    assert too_big.value.reason == "too_large"


# --- the client: its pinned key and its allowed tasks ------------------------------------------


def test_a_client_config_needs_a_well_formed_coordinator_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        ClientConfig(state_dir=tmp_path)
    assert str(missing.value) == NO_COORDINATOR_KEY
    with pytest.raises(ConfigError, match="64 hex digits"):
        ClientConfig(state_dir=tmp_path, coordinator_key="abcd")
    config = ClientConfig(state_dir=tmp_path, coordinator_key=KEY.public_hex.upper())
    assert config.coordinator_key == KEY.public_hex  # normalised


@pytest.mark.parametrize("task", ["subprocess", "os.system", "pkg.mod:f\n", "a:b:c", "", "-x:y"])
def test_allow_task_takes_only_import_paths(tmp_path: Path, task: str) -> None:
    with pytest.raises(ConfigError, match="--allow-task takes 'package.module:factory'"):
        ClientConfig(state_dir=tmp_path, coordinator_key=KEY.public_hex, allowed_tasks=(task,))


def test_join_without_a_key_or_with_a_bad_one_ends_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["join", "--state-dir", str(tmp_path), "--device", "cpu"]
    for extra, message in (([], NO_COORDINATOR_KEY), (["--coordinator-key", "12ab"], "64 hex digits"),
                           (["--coordinator-key", KEY.public_hex, "--allow-task", "bad task"],
                            "--allow-task takes")):
        result = runner.invoke(client_cli.main, base + extra, env={"ASYNCLOCO_COORDINATOR_KEY": None,
                                                                    "ASYNCLOCO_TOKEN": None})
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_allow_task_values_may_be_comma_separated() -> None:
    assert client_cli._split_tasks(("a.b:c, d:e", "f.g:h", " ")) == ("a.b:c", "d:e", "f.g:h")


def _snapshot_naming(task: str) -> Snapshot:
    config = {"task": task, "task_settings": {}, "inner": {}, "seed": 0}
    return Snapshot(SnapshotManifest("r", "rid", 0, (), 4, (), config=config), {})


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a real, importable module that no one has imported (it would leave a file)."""
    name = f"probe_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
        "def make(**settings):\n    raise RuntimeError('the factory ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("task", ["subprocess:run", "os:system", "PROBE:make", "PROBE", 7])
def test_a_task_the_volunteer_did_not_allow_is_refused_before_any_import(
    probe_module: str, tmp_path: Path, task: object
) -> None:
    if isinstance(task, str):
        task = task.replace("PROBE", probe_module)
    replica = Replica(client_id="c", device=torch.device("cpu"), data=None, allowed_tasks=("other.mod:make",))
    with pytest.raises(ConfigError, match="is not allowed on this client") as refused:
        replica.adopt(_snapshot_naming(task))  # type: ignore[arg-type]
    assert probe_module not in sys.modules and not (tmp_path / "imported").exists()
    assert replica.trainer is None
    if task == f"{probe_module}:make":
        assert f"pass --allow-task {probe_module}:make" in str(refused.value)


def test_an_allowed_task_is_imported(probe_module: str, tmp_path: Path) -> None:
    replica = Replica(client_id="c", device=torch.device("cpu"), data=None,
                      allowed_tasks=(f"{probe_module}:make",))
    with pytest.raises(RuntimeError, match="the factory ran"):
        replica.adopt(_snapshot_naming(f"{probe_module}:make"))
    assert (tmp_path / "imported").exists()
