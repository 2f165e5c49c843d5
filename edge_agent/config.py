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
from shared.protocol.topics import validate_name
from shared.runtime.sensors import SensorSource
from shared.settings import load_settings


@dataclass(frozen=True)
class AgentConfig:
    """Everything one device's agent needs."""

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    client_id: str = ""
    # The site this device belongs to (docs/sites.md): it trains the rounds that select its
    # site, and its site aggregator sums its update with its neighbours'. "" = no site.
    site: str = ""
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
    # Sensor data (CSV/Parquet, a file or a directory of them): shared/runtime/sensors.py.
    # Naming a label or target column makes `data` sensor data.
    columns: tuple[str, ...] = ()  # features / channels; () = every other column
    label_column: str = ""  # classification: the class of a row (of a window: its last row's)
    label_names: tuple[str, ...] = ()  # text labels: a name's class is its index
    target_columns: tuple[str, ...] = ()  # regression targets (a forecast: the one channel)
    time_column: str = ""  # rows are sorted by it; never a feature
    window: int = 0  # > 0: time series, windows of this many rows
    stride: int = 0  # rows between window starts; 0 = window (no overlap)
    horizon: int = 0  # > 0: forecast the next `horizon` values of the target channel
    normalize: bool = True  # standardise features with the training split's statistics
    recent_files: int = 0  # a directory: train on its newest files only (0: all)
    recent_max_age_s: float = 0.0  # a directory: files modified within this (0: any age)
    max_rows: int = 1_000_000  # rows read per round, at most (bounded memory)
    # A heterogeneous fleet to test on (docs/async.md): train slowdown× as long (real extra
    # wall time after each batch), and be on-line this fraction of the time in random spells
    # of mean online_spell_s seconds (edge_agent/availability.py).
    slowdown: float = 1.0
    min_batch_ms: float = 0.0  # the emulated device's own time per batch, at least
    online: float = 1.0
    online_spell_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client-id is required")
        if not self.data:
            raise ValueError(
                "data is required: the device's own data (.npz, IDX, image folder, or "
                "CSV/Parquet sensor data with label-column or target-columns)"
            )
        if self.site:
            validate_name("site", self.site)
        self.source()  # the sensor settings' checks
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val-fraction must be in [0, 1)")
        if self.threads < 1:
            raise ValueError("threads must be ≥ 1")
        if self.delta_wait_s < 0:
            raise ValueError("delta-wait-s must be ≥ 0")
        check_protocol_settings(self.mqtt_version, self.max_chunk_bytes)
        if self.max_local_epochs < 1 or self.max_batch_size < 1:
            raise ValueError("max-local-epochs and max-batch-size must be ≥ 1")
        if not 1 <= self.slowdown <= 1000:
            raise ValueError("slowdown must be in [1, 1000]")
        if not 0 <= self.min_batch_ms <= 60_000:
            raise ValueError("min-batch-ms must be in [0, 60000]")
        if not 0 < self.online <= 1:
            raise ValueError("online must be in (0, 1]")
        if not self.online_spell_s > 0:
            raise ValueError("online-spell-s must be > 0")

    def source(self) -> SensorSource:
        """How the device reads CSV/Parquet sensor data (unused for image data)."""
        return SensorSource(
            columns=tuple(self.columns),
            label_column=self.label_column,
            label_names=tuple(self.label_names),
            target_columns=tuple(self.target_columns),
            time_column=self.time_column,
            window=self.window,
            stride=self.stride,
            horizon=self.horizon,
            normalize=self.normalize,
            recent_files=self.recent_files,
            recent_max_age_s=self.recent_max_age_s,
            max_rows=self.max_rows,
        )

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
    parser.add_argument(
        "--site", help="the site this device belongs to (its broker is the site's), e.g. factory-1"
    )
    parser.add_argument(
        "--data",
        help="the device's data: .npz (x, y), IDX files, image folder, or CSV/Parquet sensor "
        "data (a file or a growing directory; with --label-column or --target-columns)",
    )
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
    add_sensor_arguments(parser)
    add_fleet_arguments(parser)


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags making a device slower or part-time (testing heterogeneous fleets)."""
    group = parser.add_argument_group("heterogeneous fleets (testing, docs/async.md)")
    group.add_argument(
        "--slowdown",
        type=float,
        help="train X× as long: real extra wall time after each batch (default 1)",
    )
    group.add_argument(
        "--min-batch-ms",
        type=float,
        help="emulate a device whose batch takes at least this long (× --slowdown; default 0)",
    )
    group.add_argument(
        "--online",
        type=float,
        help="be on-line this fraction of the time, in random spells (default 1: always)",
    )
    group.add_argument(
        "--online-spell-s", type=float, help="mean on-line spell in seconds (default 60)"
    )


def add_sensor_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of CSV/Parquet sensor data (see shared/runtime/sensors.py)."""
    group = parser.add_argument_group("sensor data (CSV/Parquet)")
    group.add_argument(
        "--columns", type=_names, help="feature columns / channels, comma-separated (default: all)"
    )
    group.add_argument("--label-column", help="the class label column (classification)")
    group.add_argument("--label-names", type=_names, help="text labels in class order: a,b,c")
    group.add_argument(
        "--target-columns", type=_names, help="regression target column(s), comma-separated"
    )
    group.add_argument("--time-column", help="timestamp column: rows are sorted by it")
    group.add_argument("--window", type=int, help="time series: rows per window (0: a table)")
    group.add_argument("--stride", type=int, help="rows between windows (default: --window)")
    group.add_argument(
        "--horizon", type=int, help="forecast the next N values of the one target column"
    )
    group.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="standardise features with the training split's mean/std (default on)",
    )
    group.add_argument(
        "--recent-files", type=int, help="a directory: train on its N newest files (0: all)"
    )
    group.add_argument(
        "--recent-max-age-s",
        type=float,
        help="a directory: only files modified within this many seconds (0: any age)",
    )
    group.add_argument("--max-rows", type=int, help="rows read per round, at most (1000000)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def from_args(args: argparse.Namespace) -> AgentConfig:
    """Defaults < TOML ``[agent]`` < ``FEDMQ_AGENT_*`` environment < flags."""
    return load_settings(AgentConfig, args, "agent", "FEDMQ_AGENT_")
