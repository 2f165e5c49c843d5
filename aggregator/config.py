"""Aggregator settings: named defaults, a TOML file, environment, then flags (flags win)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from shared.compression.quantize import CodecError
from shared.compression.registry import KNOWN as KNOWN_CODECS
from shared.compression.registry import resolve_codec
from shared.mqtt.options import add_plaintext_argument
from shared.protocol.global_delta import DOWNLOAD_CODECS
from shared.settings import load_settings


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator service needs to run a federation."""

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    model: str = "lenet5"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    rounds: int = 20
    min_clients: int = 2
    fraction: float = 1.0
    round_timeout: float = 120.0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    codec: str = "int8"
    # How agents download each new global model besides the retained full model: a quantized
    # delta from the previous one on global/delta (fp32, fp16, int8), or "none".
    download_codec: str = "int8"
    eval_data: str | None = None
    metrics_file: str | None = None
    client_id: str = "aggregator"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Plain mqtt:// although TLS files or a remote password are set (shared/mqtt/options.py).
    allow_plaintext: bool = False
    # Ed25519 private key (PEM) signing every global model; None = unsigned (dev only).
    signing_key: str | None = None
    # Reject updates whose delta has a larger L2 norm (over all tensors); None = off.
    max_update_norm: float | None = None
    max_update_bytes: int = 64 * 1024 * 1024
    # Update messages each client may have read per round, then per second (a flood of junk
    # on a device's own topic is dropped unread beyond it): aggregator/update_budget.py.
    update_burst: int = 10
    update_rate: float = 1.0
    wait_clients_timeout: float = 600.0
    threads: int = 1
    onnx: bool = True
    state_dir: str | None = None
    # A round below quorum at its deadline: "extend" it (same selection plus newly online
    # agents) or "retry" it (a fresh selection among online agents); accepted updates are
    # kept either way. After max_extensions the federation fails (exit code 3).
    on_starved: str = "extend"
    max_extensions: int = 5

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, "rounds must be ≥ 1"),
            (self.min_clients >= 1, "min-clients must be ≥ 1"),
            (0 < self.fraction <= 1, "fraction must be in (0, 1]"),
            (self.round_timeout > 0, "round-timeout must be > 0"),
            (self.local_epochs >= 1, "local-epochs must be ≥ 1"),
            (self.batch_size >= 1, "batch-size must be ≥ 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.momentum >= 0, "momentum must be ≥ 0"),
            (_known_codec(self.codec), f"codec must be one of: {KNOWN_CODECS}"),
            (
                self.download_codec in DOWNLOAD_CODECS,
                f"download-codec must be one of: {', '.join(DOWNLOAD_CODECS)}",
            ),
            (self.on_starved in ("extend", "retry"), "on-starved must be extend or retry"),
            (self.max_extensions >= 0, "max-extensions must be ≥ 0"),
            (self.update_burst >= 1, "update-burst must be ≥ 1"),
            (self.update_rate >= 0, "update-rate must be ≥ 0"),
            (
                self.max_update_norm is None or self.max_update_norm > 0,
                "max-update-norm must be > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every config field; unset flags do not override the file."""
    parser.add_argument("--config", type=Path, help="TOML file with these settings")
    d = AggregatorConfig()
    parser.add_argument("--broker", help=f"broker URL (default {d.broker})")
    parser.add_argument("--federation", help="federation name (topic namespace)")
    parser.add_argument("--model", help="architecture: lenet5, cnn, mlp (default lenet5)")
    parser.add_argument("--input-shape", type=_shape, help="C,H,W of one sample (default 1,28,28)")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--rounds", type=int, help=f"rounds to run (default {d.rounds})")
    parser.add_argument("--min-clients", type=int, help="quorum to close a round at its deadline")
    parser.add_argument("--fraction", type=float, help="fraction of online agents selected")
    parser.add_argument("--round-timeout", type=float, help="seconds before a round's deadline")
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--codec", help=f"update codec: {KNOWN_CODECS} (default int8)")
    parser.add_argument(
        "--download-codec",
        choices=DOWNLOAD_CODECS,
        help="global deltas for agents holding the previous model (default int8; none: "
        "full model only)",
    )
    parser.add_argument("--eval-data", help="held-out data (.npz, IDX dir, image folder)")
    parser.add_argument("--metrics-file", help="write metrics.json here after every round")
    parser.add_argument("--client-id", help="MQTT client id of the aggregator")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--ca-file", help="CA certificate that signed the broker's (mqtts://)")
    parser.add_argument("--cert-file", help="client certificate (brokers requiring one)")
    parser.add_argument("--key-file", help="private key of --cert-file")
    add_plaintext_argument(parser)
    parser.add_argument("--signing-key", help="Ed25519 private key (PEM) to sign global models")
    parser.add_argument(
        "--max-update-norm", type=float, help="reject deltas with a larger L2 norm (default off)"
    )
    parser.add_argument("--max-update-bytes", type=int)
    parser.add_argument("--wait-clients-timeout", type=float)
    parser.add_argument("--threads", type=int, help="torch threads for evaluation")
    parser.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export, verify and publish each new global model as ONNX (default on)",
    )
    parser.add_argument(
        "--state-dir",
        help="save global_model.fmq/.onnx here each round (default: the metrics file's dir); "
        "when given, also a checkpoint + journal to resume after a crash",
    )
    add_resilience_arguments(parser)
    add_budget_arguments(parser)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the per-client update budget (see AggregatorConfig.update_burst)."""
    parser.add_argument(
        "--update-burst", type=int, help="update messages read per client and round (default 10)"
    )
    parser.add_argument(
        "--update-rate",
        type=float,
        help="update messages read per client and second beyond the burst (default 1)",
    )


def add_resilience_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for what happens when a round starves (see AggregatorConfig.on_starved)."""
    parser.add_argument(
        "--on-starved",
        choices=("extend", "retry"),
        help="below quorum at the deadline: extend the round or retry it (default extend)",
    )
    parser.add_argument(
        "--max-extensions",
        type=int,
        help="extensions/retries of one round before the federation fails (default 5)",
    )


def from_args(args: argparse.Namespace) -> AggregatorConfig:
    """Defaults < TOML ``[aggregator]`` < ``FEDMQ_AGGREGATOR_*`` environment < flags."""
    return load_settings(AggregatorConfig, args, "aggregator", "FEDMQ_AGGREGATOR_")


def _known_codec(name: str) -> bool:
    try:
        resolve_codec(name)
    except CodecError:
        return False
    return True


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("input shape is C,H,W")
    return (parts[0], parts[1], parts[2])
