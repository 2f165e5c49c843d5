"""Byzantine-robust aggregation rules over a round's updates, and the memory they need.

Each rule maps the n updates Δ₁…Δₙ of a round to one aggregated delta, which the server
optimizer (:mod:`aggregator.server_opt`) then applies like FedAvg's mean:

- **Coordinate-wise median** (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML): every coordinate is the median of that
  coordinate over the n updates (n even: the mean of the two middle values). Tolerates up
  to ⌈n/2⌉ − 1 arbitrary updates per coordinate.
- **Trimmed mean** (same paper): per coordinate, drop the k = ⌊β·n⌋ smallest and k largest
  values and average the n − 2k left; 0 ≤ β < ½ (β = 0 is the plain mean). Tolerates k.
- **Krum** (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS): with f updates assumed Byzantine, each update's score is the
  sum of its squared L2 distances to its n − f − 2 nearest other updates; the update with the
  lowest score is the result. Needs n ≥ 2f + 3 (n > 2f + 2 in the paper).
- **Multi-Krum** (same paper): the mean of the m updates with the lowest scores (scores
  computed once); m = n − f unless set. m = 1 is Krum, m = n the plain mean.

**Weighting.** All four are unweighted, as in their papers: a device's sample count is its
own claim, and weighting by it would give a liar the very influence these rules remove.
FedAvg's weighting by sample count (with its share cap) is kept where the update is summed
as a stream — plain FedAvg and clipped FedAvg (:mod:`aggregator.clipping`).

**Memory.** Unlike the streaming sum, these rules need every update of the round at once.
:class:`RoundUpdates` holds them as fp32 and refuses, at construction, a round whose updates
could exceed ``max_round_memory`` (:func:`round_memory_bytes` says how much a round takes:
n·P·4 bytes held, plus n·b·8 of working space, the rules going through b = min(L, 65,536)
coordinates of one tensor at a time (L the largest tensor's size), n²·8 for Krum's
distances, P·4 + b·8 for the result and 128 KiB of numpy's casting buffers).
No MQTT, no files, no clock here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from aggregator.strategy import AggregationError, check_delta

Tensors = dict[str, np.ndarray]

# 1 GiB: the Fashion-MNIST CNN (1.66 M parameters) for 100 clients takes ≈ 0.66 GiB.
DEFAULT_MAX_ROUND_MEMORY = 1 << 30
MEMORY_FLAG = "--max-round-memory"
# The rules work on this many coordinates of one tensor at a time (n × BLOCK values):
# their working space stays n·BLOCK·8 bytes (≈ 50 MiB for 100 clients) whatever the model.
BLOCK = 1 << 16


@dataclass(frozen=True)
class RuleInfo:
    """What an aggregation rule needs and what it weights."""

    holds_round: bool  # True: every update of the round in memory at once
    weighting: str


RULES = {
    "fedavg": RuleInfo(False, "sample counts, no client above the max weight share"),
    "median": RuleInfo(True, "unweighted (Yin et al. 2018)"),
    "trimmed-mean": RuleInfo(True, "unweighted (Yin et al. 2018)"),
    "krum": RuleInfo(True, "unweighted: one update is chosen (Blanchard et al. 2017)"),
    "multi-krum": RuleInfo(True, "unweighted mean of the m chosen (Blanchard et al. 2017)"),
}


class RobustConfigError(ValueError):
    """A robust rule's settings cannot work: too few clients for f, too much memory, …."""


@dataclass(frozen=True)
class RobustConfig:
    """An aggregation rule that holds the round, and its parameters."""

    rule: str = "median"
    trim_fraction: float = 0.1  # β, trimmed-mean: cut from each side
    byzantine: int = 1  # f, krum and multi-krum
    krum_keep: int | None = None  # m, multi-krum (None: n − f)
    max_round_memory: int = DEFAULT_MAX_ROUND_MEMORY  # bytes

    def __post_init__(self) -> None:
        if self.rule not in RULES or not RULES[self.rule].holds_round:
            held = sorted(r for r, info in RULES.items() if info.holds_round)
            raise RobustConfigError(f"rule {self.rule!r} is not one of {held}")
        if not 0 <= self.trim_fraction < 0.5:
            raise RobustConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.byzantine < 0:
            raise RobustConfigError(f"byzantine must be ≥ 0, got {self.byzantine}")
        if self.krum_keep is not None and self.krum_keep < 1:
            raise RobustConfigError(f"krum_keep must be ≥ 1, got {self.krum_keep}")
        if self.max_round_memory <= 0:
            raise RobustConfigError(f"max_round_memory must be positive: {self.max_round_memory}")


def round_memory_bytes(
    rule: str,
    num_params: int,
    num_clients: int,
    itemsize: int = 4,
    largest_tensor: int | None = None,
) -> int:
    """Bytes a round of ``rule`` needs for ``num_clients`` updates of ``num_params`` values.

    0 for a streaming rule (its O(model) sum is not counted). ``largest_tensor`` (default:
    ``num_params``, the worst case) is the size of the model's largest tensor: the rules work
    on at most :data:`BLOCK` coordinates of one tensor at a time.
    """
    if not RULES[rule].holds_round:
        return 0
    block = min(num_params if largest_tensor is None else largest_tensor, BLOCK)
    n, p = num_clients, num_params
    held = n * p * itemsize
    working = n * block * 8 + (n * n * 8 if rule in ("krum", "multi-krum") else 0)
    # + numpy's casting buffers (np.getbufsize() elements, fp64, in and out) in the fp64 means.
    return held + working + p * 4 + block * 8 + np.getbufsize() * 16


def check_round_memory(
    config: RobustConfig, num_params: int, num_clients: int, largest_tensor: int | None = None
) -> int:
    """The bytes :func:`round_memory_bytes` says; RobustConfigError when over the limit."""
    need = round_memory_bytes(config.rule, num_params, num_clients, 4, largest_tensor)
    if need > config.max_round_memory:
        raise RobustConfigError(
            f"{config.rule} holds every update of a round: {num_clients} clients × "
            f"{num_params:,} fp32 parameters need {_mib(need)}, over the limit of "
            f"{_mib(config.max_round_memory)} ({MEMORY_FLAG}); raise {MEMORY_FLAG}, select "
            "fewer clients per round, or use a streaming rule (fedavg with clipping)"
        )
    return need


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_krum(num_updates: int, byzantine: int) -> None:
    """RobustConfigError unless n ≥ 2f + 3 (Blanchard et al.'s condition n > 2f + 2)."""
    if num_updates < 2 * byzantine + 3:
        raise RobustConfigError(
            f"Krum with f = {byzantine} Byzantine clients needs at least 2f + 3 = "
            f"{2 * byzantine + 3} updates, got {num_updates}: lower f or select more clients"
        )


def _blocks(
    updates: Sequence[Mapping[str, np.ndarray]], name: str, dtype: type = np.float32
) -> Iterator[tuple[slice, np.ndarray]]:
    """(coordinates, n × b array): tensor ``name`` of every update, :data:`BLOCK` coordinates
    at a time, each row cast in place (no temporaries; held updates are contiguous, so their
    flat views are not copies)."""
    flat = [np.asarray(u[name]).reshape(-1) for u in updates]
    size = flat[0].size
    for start in range(0, size, BLOCK):
        cols = slice(start, min(start + BLOCK, size))
        block: np.ndarray = np.empty((len(flat), cols.stop - start), dtype=dtype)
        for i, f in enumerate(flat):
            block[i] = f[cols]
        yield cols, block
        del block  # the caller drops its reference too: one block alive at a time


def _per_coordinate(
    updates: Sequence[Mapping[str, np.ndarray]],
    reduce: Callable[[np.ndarray], np.ndarray],
) -> Tensors:
    """``reduce`` (n × b → b, may reorder its input) over every block of every tensor; fp32."""
    out: Tensors = {}
    for name in _names(updates):
        result = np.empty(np.size(updates[0][name]), dtype=np.float32)
        for cols, block in _blocks(updates, name):
            result[cols] = reduce(block)
            del block  # freed before the generator makes the next one
        out[name] = result.reshape(np.shape(updates[0][name]))
    return out


def _names(updates: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    if not updates:
        raise AggregationError("no update to aggregate")
    return list(updates[0])


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> Tensors:
    """The coordinate-wise median of ``updates`` (unweighted), fp32."""
    # overwrite_input: partition the block in place, not a second copy of it.
    return _per_coordinate(updates, lambda b: np.median(b, axis=0, overwrite_input=True))


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], beta: float) -> Tensors:
    """Per coordinate, the mean after dropping the ⌊β·n⌋ smallest and largest values; fp32."""
    if not 0 <= beta < 0.5:
        raise RobustConfigError(f"trimmed mean needs 0 ≤ β < 0.5, got {beta}")
    n = len(updates)
    k = math.floor(beta * n)

    def cut_mean(block: np.ndarray) -> np.ndarray:
        block.sort(axis=0)  # in place
        return block[k : n - k].mean(axis=0, dtype=np.float64)

    return _per_coordinate(updates, cut_mean)


def pairwise_sq_distances(updates: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """n × n squared L2 distances between whole updates (all tensors), fp64."""
    n = len(updates)
    gram = np.zeros((n, n), dtype=np.float64)
    for name in _names(updates):
        for _, x in _blocks(updates, name, np.float64):
            gram += x @ x.T
            del x  # freed before the generator makes the next one
    sq = np.diag(gram)
    # ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b; rounding can make it slightly negative.
    return np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)


def krum_scores(updates: Sequence[Mapping[str, np.ndarray]], byzantine: int) -> np.ndarray:
    """Each update's Krum score: Σ of squared distances to its n − f − 2 nearest others."""
    n = len(updates)
    check_krum(n, byzantine)
    dist = pairwise_sq_distances(updates)
    neighbours = n - byzantine - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


def multi_krum(
    updates: Sequence[Mapping[str, np.ndarray]], byzantine: int, keep: int | None = None
) -> tuple[Tensors, list[int]]:
    """(unweighted mean of the ``keep`` best-scored updates, their indices best first).

    ``keep`` None: n − f. Ties in score go to the earlier update.
    """
    scores = krum_scores(updates, byzantine)
    m = len(updates) - byzantine if keep is None else keep
    if not 1 <= m <= len(updates):
        raise RobustConfigError(f"multi-Krum keeps 1…{len(updates)} updates, not {m}")
    chosen = [int(i) for i in np.argsort(scores, kind="stable")[:m]]
    mean = _per_coordinate([updates[i] for i in chosen], lambda b: b.mean(axis=0, dtype=np.float64))
    return mean, chosen


def krum(updates: Sequence[Mapping[str, np.ndarray]], byzantine: int) -> tuple[Tensors, int]:
    """(the update with the lowest Krum score, its index)."""
    out, chosen = multi_krum(updates, byzantine, keep=1)
    return out, chosen[0]


class RoundUpdates:
    """Every update of one round, held (fp32) for a rule that needs them all at once."""

    def __init__(
        self,
        config: RobustConfig,
        shapes: Mapping[str, tuple[int, ...]],
        capacity: int,
    ) -> None:
        """``capacity``: the most updates the round can bring (its selected clients).

        RobustConfigError when that many would need more than ``config.max_round_memory``, or
        (Krum) cannot satisfy n ≥ 2f + 3.
        """
        self.config = config
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        sizes = [math.prod(s) for s in self.shapes.values()]
        self.bytes_needed = check_round_memory(config, sum(sizes), capacity, max(sizes, default=0))
        if config.rule in ("krum", "multi-krum"):
            check_krum(capacity, config.byzantine)
            if config.krum_keep is not None and config.krum_keep > capacity - config.byzantine:
                raise RobustConfigError(
                    f"multi-Krum keeps m ≤ n − f = {capacity - config.byzantine}, "
                    f"got m = {config.krum_keep}"
                )
        self.capacity = capacity
        self.updates: list[Tensors] = []
        self.clients: list[str] = []
        self.num_samples: list[int] = []  # kept for the logs; the rules do not weight by it

    def add(self, delta: Mapping[str, np.ndarray], num_samples: int, client_id: str = "") -> None:
        """Hold one update (AggregationError: wrong tensors, not finite, or over capacity)."""
        if len(self.updates) >= self.capacity:
            raise AggregationError(f"round holds at most {self.capacity} updates (its selection)")
        check_delta(self.shapes, delta)
        self.updates.append({n: np.array(delta[n], dtype=np.float32) for n in self.shapes})
        self.clients.append(client_id)
        self.num_samples.append(num_samples)

    def aggregate(self) -> tuple[Tensors, list[str]]:
        """(the rule's aggregated delta, the clients whose updates it used).

        Median and trimmed mean use every client; (multi-)Krum the chosen ones, best first,
        at most n − f of those that came. AggregationError when there is no update;
        RobustConfigError when Krum's n ≥ 2f + 3 fails for the updates that came.
        """
        if not self.updates:
            raise AggregationError("no update was added")
        cfg = self.config
        if cfg.rule == "median":
            return coordinate_median(self.updates), list(self.clients)
        if cfg.rule == "trimmed-mean":
            return trimmed_mean(self.updates, cfg.trim_fraction), list(self.clients)
        # Fewer updates than selected: never keep more than n − f (one could be Byzantine).
        n_good = len(self.updates) - cfg.byzantine
        keep = 1 if cfg.rule == "krum" else min(cfg.krum_keep or n_good, n_good)
        out, chosen = multi_krum(self.updates, cfg.byzantine, keep)
        return out, [self.clients[i] for i in chosen]
