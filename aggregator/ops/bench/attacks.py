"""Malicious devices for benchmarks: the agent's own trainer, its update poisoned before it is
encoded, so what leaves the device is a valid frame like any honest one.

Operator tooling only (``fedmq bench strategies``): nothing here is imported by the agent.
An attack is ``KIND[:FACTOR]``:

- ``sign-flip[:s]``: −s·Δ (s = 1), the honest update reversed.
- ``scale[:s]``: s·Δ (s = 100): a model-replacement style boost of the device's own update.
- ``noise[:s]``: Gaussian noise, s times the honest update's root mean square per coordinate
  (s = 1: as long as an honest update, so a norm bound alone does not refuse it).
- ``label-flip``: trains honestly on labels c → C − 1 − c (data poisoning).
- ``alie``: "A Little Is Enough" (Baruch et al. 2019): the colluding devices train honestly,
  estimate the mean μ and standard deviation σ of the benign updates from their own, and all
  send μ − z·σ, per coordinate, with z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − m for m malicious
  of n devices: as far from the mean as the rules that look for outliers still let pass.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from edge_agent.local_training import LocalRound, LocalTrainer
from shared.protocol.messages import ModelSpec, TrainParams
from shared.runtime.data import ArrayDataset

Tensors = dict[str, np.ndarray]

KINDS = ("sign-flip", "scale", "noise", "label-flip", "alie")
DEFAULT_FACTOR = {"sign-flip": 1.0, "scale": 100.0, "noise": 1.0, "label-flip": 1.0, "alie": 1.0}
# How long a colluder waits for the others' honest updates of a round (then uses those in).
COLLUDE_WAIT_S = 120.0


class AttackError(ValueError):
    """An attack that does not exist or cannot be mounted as asked."""


@dataclass(frozen=True)
class Attack:
    """One attack: its kind and factor (see the module's docstring)."""

    kind: str
    factor: float

    @classmethod
    def parse(cls, text: str) -> Attack:
        """``KIND[:FACTOR]``, e.g. ``scale:10``; AttackError when it is not one."""
        kind, _, factor = text.partition(":")
        if kind not in KINDS:
            raise AttackError(f"attack {kind!r} is not one of {', '.join(KINDS)}")
        try:
            value = float(factor) if factor else DEFAULT_FACTOR[kind]
        except ValueError:
            raise AttackError(f"attack factor {factor!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise AttackError(f"attack factor must be positive, got {value}")
        return cls(kind, value)

    @property
    def label(self) -> str:
        """How tables name it: ``scale ×100``, ``sign-flip``, …."""
        plain = self.factor == DEFAULT_FACTOR[self.kind] and self.kind != "scale"
        return self.kind if plain else f"{self.kind} ×{self.factor:g}"


def poison(attack: Attack, delta: Tensors, rng: np.random.Generator) -> Tensors:
    """The update a device sends under ``attack`` instead of its honest ``delta`` (fp32)."""
    if attack.kind == "sign-flip":
        return {n: (-attack.factor * v).astype(np.float32) for n, v in delta.items()}
    if attack.kind == "scale":
        return {n: (attack.factor * v).astype(np.float32) for n, v in delta.items()}
    if attack.kind == "noise":
        count = sum(v.size for v in delta.values())
        rms = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
        sigma = attack.factor * rms / math.sqrt(max(count, 1))
        return {n: rng.normal(0.0, sigma, v.shape).astype(np.float32) for n, v in delta.items()}
    raise AttackError(f"{attack.kind} is not a transformation of one update")


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al.'s z_max: Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − m supporters needed."""
    s = math.floor(num_clients / 2 + 1) - num_malicious
    p = (num_clients - s) / num_clients
    if not 0 < p < 1:
        raise AttackError(
            f"ALIE needs 0 < (n − s)/n < 1, got n = {num_clients}, m = {num_malicious}"
        )
    return NormalDist().inv_cdf(p)


def alie(benign: list[Tensors], z: float) -> Tensors:
    """μ − z·σ per coordinate of ``benign`` (population standard deviation), fp32."""
    if not benign:
        raise AttackError("ALIE needs at least one benign update to estimate μ and σ")
    out: Tensors = {}
    for name in benign[0]:
        stack = np.stack([np.asarray(b[name], np.float64) for b in benign])
        out[name] = (stack.mean(axis=0) - z * stack.std(axis=0)).astype(np.float32)
    return out


def flip_labels(data: ArrayDataset, num_classes: int) -> ArrayDataset:
    """The same samples with every label c turned into C − 1 − c."""
    if data.task != "classification":
        raise AttackError("label flipping needs a classification task")
    return ArrayDataset(data.x, (num_classes - 1 - data.y).astype(np.int64))


class Collusion:
    """Where colluding devices of one process pool their honest updates, round by round."""

    def __init__(self, members: int, num_clients: int, wait_s: float = COLLUDE_WAIT_S) -> None:
        self.members = members
        self.z = alie_z(num_clients, members)
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._rounds: dict[int, dict[str, Tensors]] = {}

    def alie_update(self, round_seed: int, client_id: str, honest: Tensors) -> Tensors:
        """Deposit ``honest``; once every member's is in (or after ``wait_s``), the ALIE
        update estimated from those in."""
        end = time.monotonic() + self.wait_s
        with self._cond:
            pool = self._rounds.setdefault(round_seed, {})
            pool[client_id] = honest
            self._cond.notify_all()
            while len(pool) < self.members and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
            return alie(list(pool.values()), self.z)


class MaliciousTrainer(LocalTrainer):
    """The agent's trainer whose result is poisoned by ``attack`` before it is encoded."""

    def __init__(
        self,
        client_id: str,
        attack: Attack,
        collusion: Collusion | None = None,
        threads: int = 1,
        models: dict[tuple[Any, ...], Any] | None = None,
    ) -> None:
        super().__init__(client_id, threads, models)
        if attack.kind == "alie" and collusion is None:
            raise AttackError("ALIE devices need a Collusion to pool their updates")
        self.attack = attack
        self.collusion = collusion

    def train(
        self,
        spec: ModelSpec,
        global_params: Tensors,
        params: TrainParams,
        data: ArrayDataset,
        val: ArrayDataset | None,
        slowdown: float = 1.0,
        min_batch_s: float = 0.0,
    ) -> LocalRound:
        """Train as the agent does (on flipped labels for ``label-flip``), then poison."""
        kind = self.attack.kind
        if kind == "label-flip":
            data = flip_labels(data, spec.num_classes)
        honest = super().train(spec, global_params, params, data, val, slowdown, min_batch_s)
        if kind == "label-flip":
            return honest
        if kind == "alie":
            assert self.collusion is not None
            return replace(
                honest, delta=self.collusion.alie_update(params.seed, self.client_id, honest.delta)
            )
        rng = np.random.default_rng([params.seed, len(self.client_id), 0xBAD])
        return replace(honest, delta=poison(self.attack, honest.delta, rng))
