"""The aggregator's checkpoint: everything needed to resume after a crash, written atomically.

After every applied round the aggregator writes ``checkpoint.safetensors`` into its
``--state-dir``: the global parameters as safetensors (safe to load: no pickle) and, in the
safetensors metadata, a JSON document with the number of applied rounds, the model hash, the
selection RNG state, a fingerprint of the settings that shape the model, which clients
were counted in each round, and the run epoch (a resumed aggregator continues the same run;
a checkpoint written before runs existed has none, and resuming it starts a new run).
The server's download error-feedback residual (see
``shared/protocol/global_delta.py``), when there is one, is stored next to the parameters as tensors
named ``residual/<name>`` (``/`` never occurs in a model tensor's name); checkpoints without
it load with no residual. The strategy's state (:mod:`aggregator.round_strategy`: server
optimizer moments as tensors ``server_opt/m/<name>`` and ``server_opt/v/<name>``; its step
count, the clipping bound, the DP generator and the rounds it noised in the metadata) is
stored likewise; checkpoints written before strategies have none. A readable copy of that
JSON goes to ``checkpoint.json``; only the safetensors file is authoritative (one file, one
rename: never a model from one round with the round number of another).

Atomic = temporary file in the same directory, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.files import write_atomic
from shared.protocol.frames import tensors_hash

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
_META_KEY = "fedmq"
RESIDUAL_PREFIX = "residual/"
STRATEGY_PREFIX = "server_opt/"
FORMAT = 1

Tensors = dict[str, np.ndarray]

# Settings that change what the model *is*: resuming under different ones would silently
# mix two federations. Transport, timing and logging settings may change between runs.
FINGERPRINT_FIELDS = (
    "federation",
    "model",
    "input_shape",
    "num_classes",
    "rounds",
    "seed",
    "codec",
    "lr",
    "momentum",
    "weight_decay",
    "local_epochs",
    "batch_size",
    "min_clients",
    "fraction",
)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another configuration."""


# Settings added since checkpoints exist, with their defaults: hashed only when they differ
# from them, so a checkpoint written before them still resumes under the same settings.
LATER_FINGERPRINT_FIELDS: dict[str, object] = {
    "task": "classification",
    "num_outputs": 1,
    "regression_loss": "mse",
    # The strategy (aggregator/strategy_config.py): what the deltas become and how.
    "strategy": "fedavg",
    "server_lr": None,
    "server_momentum": 0.9,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-3,
    "robust": "fedavg",
    "trim_fraction": 0.1,
    "byzantine": 1,
    "krum_keep": None,
    "clip": "adaptive",
    "clip_bound": None,
    "clip_quantile": 0.5,
    "clip_lr": 0.2,
    "dp_noise_multiplier": None,
    "dp_epsilon": None,
    "dp_delta": 1e-5,
    "dp_clip": 1.0,
    "dp_expected_clients": None,
    "dp_accountant": "rdp",  # z derived from ε depends on it
    "proximal_mu": 0.0,
    "lr_schedule": "constant",
    "lr_final": 0.02,
    # The asynchronous mode (aggregator/async_config.py).
    "mode": "sync",
    "buffer": 10,
    "max_staleness": 5,
    "staleness_weight": "poly:0.5",
}


def config_fingerprint(cfg: object) -> str:
    """SHA-256 over the settings in :data:`FINGERPRINT_FIELDS` (and the later ones that are
    not at their defaults)."""
    values = {name: _plain(getattr(cfg, name, None)) for name in FINGERPRINT_FIELDS}
    for name, default in LATER_FINGERPRINT_FIELDS.items():
        value = getattr(cfg, name, default)
        if value != default:
            values[name] = _plain(value)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Checkpoint:
    """The aggregator's state after ``round`` applied rounds."""

    round: int
    params: Tensors
    model_hash: str
    rng_state: dict[str, Any]
    fingerprint: str
    # One entry per applied round: {"round": r, "accepted": {client: num_samples}}.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Download error feedback of the aggregator (None: none yet, or download codec none).
    residual: Tensors | None = None
    run: int | None = None  # the run epoch (None: written before runs existed)
    # The strategy's state: optimizer tensors (m/<name>, v/<name>) and scalars (None: a
    # checkpoint written before strategies).
    strategy_tensors: Tensors = field(default_factory=dict)
    strategy: dict[str, Any] | None = None


class CheckpointStore:
    """``checkpoint.safetensors`` (+ ``checkpoint.json``) in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / CHECKPOINT_FILE

    def save(self, ckpt: Checkpoint) -> None:
        """Write ``ckpt`` atomically (temp file, fsync, rename, directory fsync)."""
        doc = {
            "format": FORMAT,
            "round": ckpt.round,
            "model_hash": ckpt.model_hash,
            "rng_state": ckpt.rng_state,
            "fingerprint": ckpt.fingerprint,
            "history": ckpt.history,
            "run": ckpt.run,
            "strategy": ckpt.strategy,
        }
        text = json.dumps(doc, separators=(",", ":"))
        tensors = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in ckpt.params.items()}
        for n, v in (ckpt.residual or {}).items():
            tensors[RESIDUAL_PREFIX + n] = np.ascontiguousarray(v, dtype=np.float32)
        for n, v in ckpt.strategy_tensors.items():
            tensors[STRATEGY_PREFIX + n] = np.ascontiguousarray(v, dtype=np.float32)
        write_atomic(self.path, st_save(tensors, metadata={_META_KEY: text}))
        write_atomic(self.dir / CHECKPOINT_JSON, json.dumps(doc, indent=1).encode())

    def load(self, fingerprint: str) -> Checkpoint | None:
        """The saved checkpoint; None when there is none; CheckpointError when unusable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensors = st_load(data)
            doc = json.loads(_metadata(data)[_META_KEY])
            params = {
                n: v.astype(np.float32)
                for n, v in tensors.items()
                if not n.startswith((RESIDUAL_PREFIX, STRATEGY_PREFIX))
            }
            residual = {
                n[len(RESIDUAL_PREFIX) :]: v.astype(np.float32)
                for n, v in tensors.items()
                if n.startswith(RESIDUAL_PREFIX)
            }
            ckpt = Checkpoint(
                round=int(doc["round"]),
                params=params,
                model_hash=str(doc["model_hash"]),
                rng_state=dict(doc["rng_state"]),
                fingerprint=str(doc["fingerprint"]),
                history=list(doc.get("history", [])),
                residual=residual or None,
                run=_run(doc.get("run")),
                strategy_tensors={
                    n[len(STRATEGY_PREFIX) :]: v.astype(np.float32)
                    for n, v in tensors.items()
                    if n.startswith(STRATEGY_PREFIX)
                },
                strategy=doc.get("strategy"),
            )
        except (SafetensorError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {self.path} is unreadable: {exc}") from exc
        if ckpt.residual is not None and {n: v.shape for n, v in ckpt.residual.items()} != {
            n: v.shape for n, v in ckpt.params.items()
        }:
            raise CheckpointError(f"checkpoint {self.path}: residual does not match the model")
        if ckpt.fingerprint != fingerprint:
            raise CheckpointError(
                f"checkpoint {self.path} was written with other model/federation settings; "
                "restart with the same flags, or use another --state-dir"
            )
        if tensors_hash(ckpt.params) != ckpt.model_hash:
            raise CheckpointError(f"checkpoint {self.path}: parameters do not match their hash")
        return ckpt


def _run(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"run {value!r} is not an epoch")
    return value


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte length + JSON header)."""
    (length,) = np.frombuffer(data[:8], dtype="<u8")
    header = json.loads(data[8 : 8 + int(length)])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("safetensors metadata is not an object")
    return meta
