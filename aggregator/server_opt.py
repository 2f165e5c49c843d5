"""Server optimizers: one step of FedAvg, FedAvgM, FedAdagrad, FedAdam or FedYogi per round.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2; FedAvgM is the
server-momentum FedAvg of Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification".

**Sign convention.** The aggregation rule (:mod:`aggregator.strategy`, :mod:`aggregator.robust`,
:mod:`aggregator.dp`) gives Δₜ, the round's aggregated delta: new − old, the direction the
clients moved. The server treats gₜ = −Δₜ as a *pseudo-gradient* and takes one optimizer step
on it (all operations elementwise, x the global parameters, η the server learning rate)::

    fedavg      x ← x − η·g                                    (η = 1: x + Δ, plain FedAvg)
    fedavgm     m ← μ·m + g                      x ← x − η·m
    fedadagrad  m ← β₁·m + (1−β₁)·g;  v ← v + g²                         x ← x − η·m/(√v + τ)
    fedadam     m ← β₁·m + (1−β₁)·g;  v ← β₂·v + (1−β₂)·g²               x ← x − η·m/(√v + τ)
    fedyogi     m ← β₁·m + (1−β₁)·g;  v ← v − (1−β₂)·g²·sign(v − g²)     x ← x − η·m/(√v + τ)

The paper writes the same algorithm on Δ (its mₜ is the moment of Δ and it *adds*
η·m/(√v+τ)); our m is the negative of the paper's, v (made of squares) is the same, so the
iterates are identical. As in the paper, m starts at 0 and v at τ² (Algorithm 2 asks
v₋₁ ≥ τ²; Flower starts at 0, which differs only in the first rounds), and there is no bias
correction unless ``bias_correction`` is set: then η is scaled by √(1−β₂ᵗ)/(1−β₁ᵗ) in round t
for fedadam and fedyogi (what Flower does).

**Precision.** fedavg computes x + η·Δ in fp32, so η = 1 gives exactly the model
:meth:`StreamingFedAvg.apply` gives today. The other steps compute in fp64 and keep x, m and v
in fp32: the state costs 1× (fedavgm) or 2× (adaptive) the model's fp32 size.

**State.** :class:`ServerOptState` (step count + m, v) is a value: :meth:`ServerOptimizer.step`
returns a new state and never changes its inputs, so a round whose model is then discarded
leaves the optimizer as it was. ``to_dict`` / :meth:`ServerOptimizer.state_from_dict` turn it
into tensors + JSON scalars for the checkpoint; a restored state continues bit for bit.
No MQTT, no files, no clock here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.strategy import AggregationError

Tensors = dict[str, np.ndarray]

STRATEGIES = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
# η when none is given: FedAvg's own step for fedavg/fedavgm; a small step for the adaptive
# ones, whose update is ≈ η per coordinate whatever the delta's scale (tune it: Reddi et al.
# searched η over 10^-3…10^0 per task).
DEFAULT_SERVER_LR = {
    "fedavg": 1.0,
    "fedavgm": 1.0,
    "fedadagrad": 0.01,
    "fedadam": 0.01,
    "fedyogi": 0.01,
}


class ServerOptError(ValueError):
    """Bad optimizer settings, or a saved state that does not fit this optimizer."""


@dataclass(frozen=True)
class ServerOptConfig:
    """Which server optimizer and its hyper-parameters (Reddi et al.'s names)."""

    strategy: str = "fedavg"
    server_lr: float | None = None  # η; None: DEFAULT_SERVER_LR[strategy]
    momentum: float = 0.9  # μ, fedavgm only
    beta1: float = 0.9  # β₁, adaptive only
    beta2: float = 0.99  # β₂, fedadam and fedyogi
    tau: float = 1e-3  # τ, adaptivity (the ε of Adam)
    bias_correction: bool = False  # fedadam/fedyogi: scale η by √(1−β₂ᵗ)/(1−β₁ᵗ)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ServerOptError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.server_lr is not None and not (
            self.server_lr > 0 and math.isfinite(self.server_lr)
        ):
            raise ServerOptError(f"server_lr must be positive and finite, got {self.server_lr}")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ServerOptError(f"{name} must be in [0, 1), got {value}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ServerOptError(f"tau must be positive and finite, got {self.tau}")

    @property
    def lr(self) -> float:
        """η: the configured server learning rate, or the strategy's default."""
        return DEFAULT_SERVER_LR[self.strategy] if self.server_lr is None else self.server_lr


@dataclass(frozen=True)
class ServerOptState:
    """Rounds stepped so far and the moments (m: fedavgm and adaptive; v: adaptive), fp32."""

    strategy: str
    step: int = 0
    m: Tensors = field(default_factory=dict)
    v: Tensors = field(default_factory=dict)

    def to_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """(tensors ``m/<name>``, ``v/<name>``; JSON-able scalars) for a checkpoint."""
        tensors = {f"m/{n}": a for n, a in self.m.items()}
        tensors.update({f"v/{n}": a for n, a in self.v.items()})
        return tensors, {"strategy": self.strategy, "step": self.step}


class ServerOptimizer:
    """Applies a round's aggregated delta to the global model with the configured optimizer."""

    def __init__(self, config: ServerOptConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.config = config
        self.shapes = {n: tuple(s) for n, s in shapes.items()}

    def _moments(self) -> tuple[bool, bool]:
        kind = self.config.strategy
        return kind != "fedavg", kind in ADAPTIVE

    def initial_state(self) -> ServerOptState:
        """Step 0: m = 0, v = τ² (only the moments this strategy uses)."""
        has_m, has_v = self._moments()
        tau2 = np.float32(self.config.tau**2)
        return ServerOptState(
            self.config.strategy,
            0,
            {n: np.zeros(s, np.float32) for n, s in self.shapes.items()} if has_m else {},
            {n: np.full(s, tau2, np.float32) for n, s in self.shapes.items()} if has_v else {},
        )

    def state_from_dict(
        self, tensors: Mapping[str, np.ndarray], scalars: Mapping[str, Any]
    ) -> ServerOptState:
        """The state :meth:`ServerOptState.to_dict` wrote; ServerOptError when it does not fit."""
        strategy = scalars.get("strategy")
        if strategy != self.config.strategy:
            raise ServerOptError(
                f"saved optimizer state is {strategy!r}, configured {self.config.strategy!r}"
            )
        step = scalars.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ServerOptError(f"saved optimizer step {step!r} is not a round count")
        has_m, has_v = self._moments()
        want = {f"m/{n}": s for n, s in self.shapes.items() if has_m}
        want.update({f"v/{n}": s for n, s in self.shapes.items() if has_v})
        got = {k: tuple(np.shape(a)) for k, a in tensors.items()}
        if got != want:
            raise ServerOptError(f"saved optimizer tensors {sorted(got)} do not fit the model")
        arr = {k: np.array(a, dtype=np.float32) for k, a in tensors.items()}
        m = {n: arr[f"m/{n}"] for n in self.shapes if has_m}
        v = {n: arr[f"v/{n}"] for n in self.shapes if has_v}
        return ServerOptState(strategy, step, m, v)

    def step(
        self,
        state: ServerOptState,
        params: Mapping[str, np.ndarray],
        delta: Mapping[str, np.ndarray],
    ) -> tuple[Tensors, ServerOptState]:
        """(new parameters, new state) after one round with aggregated delta ``delta``.

        Neither ``state`` nor ``params`` is modified. AggregationError when a new parameter is
        not finite in fp32 (the caller keeps the old model and the old state).
        """
        if state.strategy != self.config.strategy:
            raise ServerOptError(f"state of {state.strategy!r} given to {self.config.strategy!r}")
        if set(delta) != set(self.shapes) or set(params) != set(self.shapes):
            raise AggregationError("params and delta must have exactly the model's tensors")
        kind, t = self.config.strategy, state.step + 1
        out: Tensors = {}
        m: Tensors = {}
        v: Tensors = {}
        for name in self.shapes:
            x = np.asarray(params[name], dtype=np.float32)
            d = np.asarray(delta[name], dtype=np.float32)
            if kind == "fedavg":
                with np.errstate(over="ignore", invalid="ignore"):  # refused below
                    out[name] = x + np.float32(self.config.lr) * d
            else:
                out[name], m[name], vn = self._moment_step(
                    kind, t, x, d, state.m[name], state.v.get(name)
                )
                if vn is not None:
                    v[name] = vn
            if not np.isfinite(out[name]).all():
                raise AggregationError(f"{name}: the server step leaves fp32 ({kind})")
        return out, ServerOptState(kind, t, m, v)

    def _moment_step(
        self,
        kind: str,
        t: int,
        x: np.ndarray,
        delta: np.ndarray,
        m_prev: np.ndarray,
        v_prev: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One tensor's (x, m, v) after step t, in fp64, returned as fp32."""
        cfg = self.config
        g = -delta.astype(np.float64)  # the pseudo-gradient
        m0 = m_prev.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite x is refused
            if kind == "fedavgm":
                m = cfg.momentum * m0 + g
                x_new = x.astype(np.float64) - cfg.lr * m
                return x_new.astype(np.float32), m.astype(np.float32), None
            assert v_prev is not None
            v0 = v_prev.astype(np.float64)
            g2 = g * g
            m = cfg.beta1 * m0 + (1 - cfg.beta1) * g
            if kind == "fedadagrad":
                v = v0 + g2
            elif kind == "fedadam":
                v = cfg.beta2 * v0 + (1 - cfg.beta2) * g2
            else:  # fedyogi
                v = v0 - (1 - cfg.beta2) * g2 * np.sign(v0 - g2)
            lr = cfg.lr
            if cfg.bias_correction and kind != "fedadagrad":
                lr *= math.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t)
            x_new = x.astype(np.float64) - lr * m / (np.sqrt(v) + cfg.tau)
            return x_new.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
