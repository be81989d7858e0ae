"""The client's resolved configuration: one frozen dataclass, validated when it is built.

Config flows one way: CLI option (with its ``ASYNCLOCO_*`` envvar) → :class:`ClientConfig` → the
worker and its components. Nothing below the CLI reads the environment, with one exception: the
default state directory follows ``$XDG_STATE_HOME`` (see :func:`shared.files.default_state_dir`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from client.identity import validate_client_id
from client.memory_caps import MemoryCaps
from client.politeness import PolitenessConfig
from shared.codecs import get_codec
from shared.delta_parts import PART_HEADER_BYTES
from shared.errors import ConfigError, ProtocolError
from shared.files import default_state_dir
from shared.keys import validate_run_name
from shared.protocol import DEFAULT_DELTA_LIMITS, MiB
from shared.settings import ConnectionSettings, RetryPolicy
from shared.signing import VerifyKey
from shared.tasks import BUILTIN, TASK_IMPORT_PATH

DEVICES = ("auto", "cpu", "cuda", "mps")
CUDA_INDEX = re.compile(r"cuda:\d{1,3}")  # one GPU of several
LOG_LEVELS = ("debug", "info", "warning", "error")
NO_COORDINATOR_KEY = ("no coordinator key: pass --coordinator-key (asyncloco-coordinator key prints it) "
                      "or a join token")


@dataclass(frozen=True)
class ClientConfig:
    """Everything one client process needs; see ``asyncloco-client join --help`` for each field.

    ``max_rounds``, ``max_seconds`` and ``max_hours`` (of training) of 0 mean "run until stopped".
    ``threads`` of 0 leaves torch's own thread count alone (the CLI passes half the cores by
    default). ``upload_grace_s`` bounds how long a stopping client keeps trying to send its last
    delta; ``poll_s`` is how often it looks for the coordinator's first snapshot and round plan,
    and how often a paused one asks again whether it may train.
    """

    run: str = "default"
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    data: str | None = None  # replaces the task's "data" setting (a glob of text files)
    device: str = "auto"
    codec: str = "int3"  # 0.41 bytes a parameter, eval loss level with fp32 (docs/BENCHMARKS.md)
    slowdown: float = 1.0  # emulate hardware this many times slower (>= 1)
    client_id: str | None = None  # None: a random id generated once and kept in state_dir
    state_dir: Path = field(default_factory=default_state_dir)
    threads: int = 0
    max_rounds: int = 0
    max_seconds: float = 0.0
    # Stop once this process has trained this long (rounds' compute time, abandoned ones included;
    # pauses and waits on the coordinator not), sending the round in hand. 0: no limit.
    max_hours: float = 0.0
    # When the owner lets this machine train (--schedule, battery, --idle-only): client/politeness.py.
    politeness: PolitenessConfig = field(default_factory=PolitenessConfig)
    # How much memory it may take (--max-memory, --max-gpu-memory): client/memory_caps.py.
    memory: MemoryCaps = field(default_factory=MemoryCaps)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    log_level: str = "warning"
    upload_grace_s: float = 30.0
    # After a delta is confirmed, wait up to this long for a snapshot that includes it, so the
    # next round does not start from a base that lacks this client's own last work (which would
    # send nearly the same delta twice). 0 disables this and the wait for a newer base before the
    # next round (tests without a coordinator); the coordinator normally commits within ~1 s.
    include_wait_s: float = 10.0
    # Start the next round before the last delta is in a snapshot, from the newest snapshot moved
    # by the client's own deltas as the coordinator will move it (client/overlap.py). On by
    # default, like follow: together they reached a given loss sooner in real runs and in the
    # simulator (docs/BENCHMARKS.md, "Rounds that move onto newer snapshots").
    overlap: bool = True
    # Move a round onto each newer snapshot while it trains, its progress carried (by patches:
    # client/overlap.MidRoundRebase), so that its delta is tagged with a recent version.
    follow: bool = True
    poll_s: float = 1.0
    # How long a run that never showed up in Redis, or a coordinator of another protocol version,
    # is waited for before the client gives up for good (NoSuchRun, ProtocolMismatch). 0: for ever.
    run_wait_s: float = 60.0
    # A delta message bigger than this is sent as parts of this many bytes (the coordinator puts
    # them together). It must stay under the broker's message limit (16 MiB in RabbitMQ 4.x).
    part_bytes: int = 8 * MiB
    # The coordinator's Ed25519 public key (64 hex digits), pinned from the operator or the join
    # token: every manifest and plan is checked against it. Required (a client with no key would
    # train on whatever anyone wrote to Redis); "" only so the field can follow the defaults.
    coordinator_key: str = ""
    # Tasks besides the built-in "bytelm" that this volunteer allows a run to name
    # ("package.module:factory"); a run naming any other task is refused before anything is imported.
    allowed_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_run_name(self.run)
        if not self.coordinator_key:
            raise ConfigError(NO_COORDINATOR_KEY)
        # Normalised (lowercase) and checked here, so a bad key fails before anything starts.
        object.__setattr__(self, "coordinator_key", VerifyKey.from_hex(self.coordinator_key).hex)
        allowed = tuple(self.allowed_tasks)
        for name in allowed:
            if not (isinstance(name, str) and (name == BUILTIN or TASK_IMPORT_PATH.fullmatch(name))):
                raise ConfigError(f"--allow-task takes 'package.module:factory', not {str(name)[:80]!r}")
        object.__setattr__(self, "allowed_tasks", allowed)
        if self.device not in DEVICES and not CUDA_INDEX.fullmatch(self.device):
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, not {self.device!r}")
        try:
            get_codec(self.codec)
        except ProtocolError as exc:
            raise ConfigError(f"--codec: {exc.detail}") from None
        if not (math.isfinite(self.slowdown) and self.slowdown >= 1.0):
            raise ConfigError(f"--slowdown must be a finite number >= 1, got {self.slowdown}")
        if self.client_id is not None:
            validate_client_id(self.client_id)
        if self.data is not None and not self.data.strip():
            raise ConfigError("--data must name a glob of text files (or be left out)")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if self.max_rounds < 0 or self.max_seconds < 0 or not math.isfinite(self.max_seconds):
            raise ConfigError("--max-rounds and --max-seconds must be >= 0 (0 = no limit)")
        if not (math.isfinite(self.max_hours) and self.max_hours >= 0):
            raise ConfigError(f"--max-hours must be hours >= 0 (0 = no limit), got {self.max_hours}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.include_wait_s < 0:
            raise ConfigError("include_wait_s must be >= 0")
        if not (self.run_wait_s >= 0 and math.isfinite(self.run_wait_s)):
            raise ConfigError(f"--run-wait must be seconds >= 0 (0: for ever), got {self.run_wait_s}")
        largest = DEFAULT_DELTA_LIMITS.max_message_bytes - PART_HEADER_BYTES
        if not 1024 <= self.part_bytes <= largest:
            raise ConfigError(f"--part-bytes must be within 1024..{largest} (under the broker's "
                              f"{DEFAULT_DELTA_LIMITS.max_message_bytes // MiB} MiB message limit)")
        if self.upload_grace_s <= 0 or self.poll_s <= 0:
            raise ConfigError("upload_grace_s and poll_s must be > 0")
        # A str path from a caller is accepted and normalised (the dataclass is frozen).
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())

    @property
    def logging_level(self) -> int:
        """The ``logging`` module's level number for ``log_level``."""
        return int(getattr(logging, self.log_level.upper()))
