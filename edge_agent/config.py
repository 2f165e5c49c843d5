"""Agent settings: named defaults, a TOML file, environment, then flags (flags win)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from shared.mqtt.chunking import DEFAULT_MAX_CHUNK_BYTES
from shared.mqtt.options import (
    add_plaintext_argument,
    add_protocol_arguments,
    check_protocol_settings,
)
from shared.mqtt.versions import AUTO
from shared.settings import load_settings


@dataclass(frozen=True)
class AgentConfig:
    """Everything one device's agent needs."""

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    client_id: str = ""
    data: str = ""
    val_fraction: float = 0.0
    threads: int = 1
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # MQTT protocol version: "5", "3.1.1" or "auto" (5, else 3.1.1); see docs/brokers.md.
    mqtt_version: str = AUTO
    # Payloads over this many bytes travel as chunks (an MQTT 5 broker may lower it).
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    # Plain mqtt:// although TLS files or a remote password are set (shared/mqtt/options.py).
    allow_plaintext: bool = False
    # Pinned Ed25519 key: only models signed by it are loaded. None = dev mode (unsigned OK).
    model_public_key: str | None = None
    max_frame_bytes: int = 256 * 1024 * 1024
    resend_after_s: float = 30.0
    # A round announced on a model we do not hold: wait this long for its global delta,
    # then download the full model instead.
    delta_wait_s: float = 5.0
    connect_timeout: float = 60.0
    exit_when_finished: bool = True
    # Device-local state (error-feedback residual); "" = $XDG_STATE_HOME/fedmq/<client-id>
    state_dir: str = ""
    warm_up: bool = False  # True: import torch before going online (first round is faster)
    # What one round may cost this device: an announcement asking for more is refused (logged,
    # skipped). The protocol bounds every training parameter too (shared/protocol/messages.py).
    max_local_epochs: int = 20
    max_batch_size: int = 1024

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client-id is required")
        if not self.data:
            raise ValueError("data is required: the device's own data (.npz, IDX, image folder)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val-fraction must be in [0, 1)")
        if self.threads < 1:
            raise ValueError("threads must be ≥ 1")
        if self.delta_wait_s < 0:
            raise ValueError("delta-wait-s must be ≥ 0")
        check_protocol_settings(self.mqtt_version, self.max_chunk_bytes)
        if self.max_local_epochs < 1 or self.max_batch_size < 1:
            raise ValueError("max-local-epochs and max-batch-size must be ≥ 1")

    def resolved_state_dir(self) -> Path:
        """``state_dir``, or ``~/.local/state/fedmq/<client-id>`` (XDG_STATE_HOME honoured)."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "fedmq" / self.client_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; unset flags do not override the file or environment."""
    parser.add_argument("--config", type=Path, help="TOML file ([agent] table)")
    parser.add_argument("--broker", help="broker URL, e.g. mqtt://192.168.1.10:1883")
    parser.add_argument("--federation", help="federation name")
    parser.add_argument("--client-id", help="this device's id, e.g. pi-07")
    parser.add_argument("--data", help="the device's data: .npz (x, y), IDX files, image folder")
    parser.add_argument(
        "--val-fraction", type=float, help="hold out this fraction for local validation (default 0)"
    )
    parser.add_argument("--threads", type=int, help="torch threads for training (default 1)")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--ca-file", help="CA certificate that signed the broker's (mqtts://)")
    parser.add_argument("--cert-file", help="client certificate (brokers requiring one)")
    parser.add_argument("--key-file", help="private key of --cert-file")
    add_protocol_arguments(parser)
    add_plaintext_argument(parser)
    parser.add_argument(
        "--model-public-key",
        help="Ed25519 public key (PEM): load only global models signed by it (no rollback)",
    )
    parser.add_argument("--max-frame-bytes", type=int)
    parser.add_argument("--resend-after-s", type=float)
    parser.add_argument(
        "--delta-wait-s",
        type=float,
        help="seconds to wait for a round's global delta before downloading the full model "
        "(default 5)",
    )
    parser.add_argument("--connect-timeout", type=float)
    parser.add_argument(
        "--state-dir", help="device state, e.g. the error-feedback residual of top-k codecs"
    )
    parser.add_argument(
        "--stay",
        dest="exit_when_finished",
        action="store_const",
        const=False,
        help="keep running after the federation finishes",
    )
    parser.add_argument(
        "--max-local-epochs",
        type=int,
        help="refuse rounds asking for more local epochs than this device affords (default 20)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help="refuse rounds asking for a larger batch than this device affords (default 1024)",
    )
    parser.add_argument(
        "--warm-up",
        dest="warm_up",
        action="store_const",
        const=True,
        help="load torch before going online (by default torch is imported at the first round "
        "the agent trains, so a waiting or presence-only agent stays small)",
    )


def from_args(args: argparse.Namespace) -> AgentConfig:
    """Defaults < TOML ``[agent]`` < ``FEDMQ_AGENT_*`` environment < flags."""
    return load_settings(AgentConfig, args, "agent", "FEDMQ_AGENT_")
