"""Aggregator settings: named defaults, a TOML file, environment, then flags (flags win)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from aggregator.async_config import add_async_arguments, async_checks
from aggregator.robust import DEFAULT_MAX_ROUND_MEMORY
from aggregator.site_config import add_site_arguments, site_checks
from aggregator.strategy_config import add_strategy_arguments, strategy_checks
from aggregator.update_bounds import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_UPDATE_NORM
from shared.compression.quantize import CodecError
from shared.compression.registry import KNOWN as KNOWN_CODECS
from shared.compression.registry import resolve_codec
from shared.mqtt.chunking import DEFAULT_MAX_CHUNK_BYTES
from shared.mqtt.options import (
    add_plaintext_argument,
    add_protocol_arguments,
    check_protocol_settings,
)
from shared.mqtt.versions import AUTO
from shared.protocol import messages as msg
from shared.protocol.global_delta import DOWNLOAD_CODECS
from shared.settings import load_settings


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator service needs to run a federation."""

    broker: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    # A built-in architecture or a model plugin's name (shared/runtime/plugins.py).
    model: str = "lenet5"
    # One sample's shape: (C, H, W) images, (C, L) sensor windows, (F,) feature vectors.
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    # "classification" (num_classes logits, cross-entropy, accuracy) or "regression"
    # (num_outputs values, regression_loss, RMSE and MAE).
    task: str = "classification"
    num_outputs: int = 1
    regression_loss: str = "mse"
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
    # MQTT protocol version: "5", "3.1.1" or "auto" (5, else 3.1.1); see docs/brokers.md.
    mqtt_version: str = AUTO
    # Payloads over this many bytes travel as chunks (an MQTT 5 broker may lower it).
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    # Plain mqtt:// although TLS files or a remote password are set (shared/mqtt/options.py).
    allow_plaintext: bool = False
    # Ed25519 private key (PEM) signing every global model; None = unsigned (dev only).
    signing_key: str | None = None
    # Reject updates whose delta has a larger L2 norm (over all tensors); inf or None = off.
    # On by default: measured on honest updates, see aggregator/update_bounds.py.
    max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM
    # Reject updates claiming more samples than this (or than the device's status declares).
    max_samples: int = DEFAULT_MAX_SAMPLES
    # No device's weight may exceed this share of a round's total weight (1.0 = no cap).
    max_weight_share: float = 0.5
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
    # The run epoch agents order models by (with the round). None: continue the run of
    # --state-dir's checkpoint, else start a new one (the start time in milliseconds).
    run: int | None = None
    # --- sites (docs/sites.md) ---
    # Run as site NAME's aggregator (beside its bridged site broker): one partial aggregate
    # per central round instead of a federation of its own.
    site: str | None = None
    # The central aggregator's public key (PEM): a site follows only announcements it signed.
    central_key: str | None = None
    # The share of a central round's remaining time a site keeps for its partial's trip up.
    site_margin: float = 0.2
    # The codec of a site's partials; "" = each round's announced codec (the devices').
    partial_codec: str = ""
    # Central: the most devices one site may say it stands for (its status is the site's own
    # word; its partial may claim at most max_samples per device).
    max_site_devices: int = 1000
    # --- strategy (aggregator/strategy_config.py, docs/strategies.md) ---
    # The server optimizer applied to each round's aggregated delta.
    strategy: str = "fedavg"
    server_lr: float | None = None  # η; None: the strategy's default
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    # The aggregation rule: fedavg streams; median, trimmed-mean, (multi-)krum hold the round.
    robust: str = "fedavg"
    trim_fraction: float = 0.1
    byzantine: int = 1
    krum_keep: int | None = None
    max_round_memory: int = DEFAULT_MAX_ROUND_MEMORY
    # Norm clipping of each update; adaptive by default (why: docs/strategies.md).
    clip: str = "adaptive"
    clip_bound: float | None = None  # fixed: the bound; adaptive: C₀ (None: from round 1)
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    # Client-level differential privacy: on when a noise multiplier or an ε is set.
    dp_noise_multiplier: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_expected_clients: float | None = None
    dp_accountant: str = "rdp"
    # FedProx: μ of the devices' proximal term, sent in every round announcement.
    proximal_mu: float = 0.0
    # The devices' learning rate over the rounds: `lr` throughout, or a cosine decay from
    # `lr` to `lr_final` × `lr` at round `rounds` (sent in each round announcement).
    lr_schedule: str = "constant"
    lr_final: float = 0.02
    # --- asynchronous mode (aggregator/async_config.py, docs/async.md) ---
    mode: str = "sync"
    buffer: int = 10
    max_staleness: int = 5
    staleness_weight: str = "poly:0.5"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        checks = [
            (self.rounds >= 1, "rounds must be ≥ 1"),
            (self.min_clients >= 1, "min-clients must be ≥ 1"),
            (0 < self.fraction <= 1, "fraction must be in (0, 1]"),
            (self.round_timeout > 0, "round-timeout must be > 0"),
            (self.local_epochs >= 1, "local-epochs must be ≥ 1"),
            (self.batch_size >= 1, "batch-size must be ≥ 1"),
            *_protocol_checks(self),
            (_known_codec(self.codec), f"codec must be one of: {KNOWN_CODECS}"),
            (
                self.download_codec in DOWNLOAD_CODECS,
                f"download-codec must be one of: {', '.join(DOWNLOAD_CODECS)}",
            ),
            (self.on_starved in ("extend", "retry"), "on-starved must be extend or retry"),
            (self.task in msg.TASKS, f"task must be one of: {', '.join(msg.TASKS)}"),
            (
                self.regression_loss in msg.REGRESSION_LOSSES,
                f"regression-loss must be one of: {', '.join(msg.REGRESSION_LOSSES)}",
            ),
            (self.max_extensions >= 0, "max-extensions must be ≥ 0"),
            (self.update_burst >= 1, "update-burst must be ≥ 1"),
            (self.update_rate >= 0, "update-rate must be ≥ 0"),
            (
                self.max_update_norm is None or self.max_update_norm > 0,
                "max-update-norm must be > 0",
            ),
            (self.max_samples >= 1, "max-samples must be ≥ 1"),
            (0 < self.max_weight_share <= 1, "max-weight-share must be in (0, 1]"),
            *strategy_checks(self),
            *async_checks(self),
            *site_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_protocol_settings(self.mqtt_version, self.max_chunk_bytes)


# Agents refuse announcements outside the protocol's bounds: refuse to start with them.
_MAX_SEED = (msg.MAX_SEED - 1_000_000_000) // 100_003  # the round seed is seed·100003 + round


def _protocol_checks(cfg: AggregatorConfig) -> list[tuple[bool, str]]:
    return [
        (0 < cfg.lr <= msg.MAX_LR, f"lr must be in (0, {msg.MAX_LR:g}]"),
        (0 <= cfg.momentum < msg.MAX_MOMENTUM, f"momentum must be in [0, {msg.MAX_MOMENTUM:g})"),
        (
            0 <= cfg.weight_decay <= msg.MAX_WEIGHT_DECAY,
            f"weight-decay must be in [0, {msg.MAX_WEIGHT_DECAY:g}]",
        ),
        (
            cfg.local_epochs <= msg.MAX_LOCAL_EPOCHS,
            f"local-epochs must be ≤ {msg.MAX_LOCAL_EPOCHS}",
        ),
        (cfg.batch_size <= msg.MAX_BATCH_SIZE, f"batch-size must be ≤ {msg.MAX_BATCH_SIZE}"),
        (0 <= cfg.seed <= _MAX_SEED, f"seed must be in [0, {_MAX_SEED}]"),
        (
            1 <= len(cfg.input_shape) <= 3,
            "input-shape must have 1 to 3 dimensions (C,H,W; C,L; or F)",
        ),
        (
            all(0 < d <= msg.MAX_INPUT_DIM for d in cfg.input_shape),
            f"input-shape dimensions must be in [1, {msg.MAX_INPUT_DIM}]",
        ),
        (0 < cfg.num_classes <= msg.MAX_CLASSES, f"num-classes must be in [1, {msg.MAX_CLASSES}]"),
        (0 < cfg.num_outputs <= msg.MAX_OUTPUTS, f"num-outputs must be in [1, {msg.MAX_OUTPUTS}]"),
        (cfg.run is None or 0 <= cfg.run <= msg.MAX_RUN, f"run must be in [0, {msg.MAX_RUN}]"),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every config field; unset flags do not override the file."""
    parser.add_argument("--config", type=Path, help="TOML file with these settings")
    d = AggregatorConfig()
    parser.add_argument("--broker", help=f"broker URL (default {d.broker})")
    parser.add_argument("--federation", help="federation name (topic namespace)")
    parser.add_argument(
        "--model", help="architecture: lenet5, cnn, mlp, or a model plugin's name (default lenet5)"
    )
    parser.add_argument(
        "--input-shape", type=_shape, help="one sample: C,H,W or C,L or F (default 1,28,28)"
    )
    parser.add_argument("--num-classes", type=int)
    add_task_arguments(parser)
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
    add_protocol_arguments(parser)
    add_plaintext_argument(parser)
    parser.add_argument("--signing-key", help="Ed25519 private key (PEM) to sign global models")
    parser.add_argument(
        "--max-update-norm",
        type=float,
        help=f"reject deltas with a larger L2 norm (default {d.max_update_norm}; inf: off)",
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
    parser.add_argument(
        "--run",
        type=int,
        help="run epoch (default: continue --state-dir's run, else a new one: the start time "
        "in ms); agents follow the largest run",
    )
    add_weight_arguments(parser)
    add_budget_arguments(parser)
    add_strategy_arguments(parser)
    add_async_arguments(parser)
    add_site_arguments(parser)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for what the model predicts (see AggregatorConfig.task)."""
    parser.add_argument(
        "--task",
        choices=msg.TASKS,
        help="classification (num-classes logits) or regression (num-outputs values)",
    )
    parser.add_argument("--num-outputs", type=int, help="values a regression model predicts")
    parser.add_argument(
        "--regression-loss",
        choices=msg.REGRESSION_LOSSES,
        help="loss of a regression task: mse or mae (default mse)",
    )


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


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags bounding the weight one device's update may take (see aggregator/update_bounds.py)."""
    d = AggregatorConfig()
    parser.add_argument(
        "--max-samples",
        type=int,
        help=f"reject updates claiming more samples than this (default {d.max_samples})",
    )
    parser.add_argument(
        "--max-weight-share",
        type=float,
        help="cap any device's weight at this share of a round's total "
        f"(default {d.max_weight_share}; 1: no cap)",
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


def _shape(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("input shape is C,H,W or C,L or F (integers)") from None
    if not 1 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError("input shape is C,H,W or C,L or F")
    return parts
