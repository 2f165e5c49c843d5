"""What makes the aggregator crash-safe: checkpoint + journal, and the starved-round policy.

:class:`Durability` is the service's one handle on its state directory: it restores the last
checkpoint and the open round's journal at start, journals announcements and accepted
updates (before their receipts), and checkpoints each applied round (then drops its
journal). :func:`starved_action` is the pure policy for a round below quorum at its deadline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.checkpoint import Checkpoint, CheckpointStore, config_fingerprint
from aggregator.journal import JournaledRound, RoundJournal
from aggregator.rounds import RoundState

log = logging.getLogger("fedmq.aggregator.resume")

Tensors = dict[str, np.ndarray]

# Exit code of an aggregator whose round stayed below quorum after every extension/retry.
EXIT_STARVED = 3


@dataclass(frozen=True)
class Restored:
    """The state a restarted aggregator continues from."""

    checkpoint: Checkpoint | None
    open_round: JournaledRound | None  # the round after the checkpoint, if it was announced


class Durability:
    """Checkpoint store + round journal in one state directory."""

    def __init__(self, state_dir: Path, cfg: object) -> None:
        self.store = CheckpointStore(state_dir)
        self.journal = RoundJournal(state_dir)
        self.fingerprint = config_fingerprint(cfg)
        self.history: list[dict[str, Any]] = []

    def restore(self) -> Restored:
        """Load the checkpoint (CheckpointError if foreign) and the next round's journal."""
        ckpt = self.store.load(self.fingerprint)
        applied = ckpt.round if ckpt is not None else 0
        self.history = list(ckpt.history) if ckpt is not None else []
        # Journals of applied rounds are already in the checkpoint: never replay them.
        self.journal.clear_through(applied)
        jr = self.journal.load(applied + 1)
        base = ckpt.model_hash if ckpt is not None else None
        if jr is not None and base is not None and jr.announce.get("base_hash") != base:
            log.warning("journal of round %d is on another base model: discarded", applied + 1)
            self.journal.clear_through(applied + 1)
            jr = None
        return Restored(ckpt, jr)

    def announced(self, state: RoundState, rng: np.random.Generator) -> None:
        """Journal an announcement before it is published."""
        self.journal.announce(
            state.round_id,
            state.base_hash,
            sorted(state.selected),
            state.deadline,
            state.extensions,
            rng_state(rng),
        )

    def accepted(self, round_id: int, client_id: str, num_samples: int, payload: bytes) -> None:
        """Journal an accepted update before its receipt is sent."""
        self.journal.accept(round_id, client_id, num_samples, payload)

    def applied(
        self,
        state: RoundState,
        params: Tensors,
        model_hash: str,
        rng: np.random.Generator,
        residual: Tensors | None = None,
    ) -> None:
        """Checkpoint round ``state.round_id`` as applied, then drop its journal."""
        self.history.append({"round": state.round_id, "accepted": dict(state.accepted)})
        self.store.save(
            Checkpoint(
                round=state.round_id,
                params=params,
                model_hash=model_hash,
                rng_state=rng_state(rng),
                fingerprint=self.fingerprint,
                history=self.history,
                residual=residual,
            )
        )
        self.journal.clear_through(state.round_id)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able state of ``rng``'s bit generator."""
    return dict(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore a state saved by :func:`rng_state`."""
    rng.bit_generator.state = state


def starved_action(extensions: int, policy: str, max_extensions: int) -> str:
    """``extend`` / ``retry`` (the policy) while extensions remain, then ``fail``."""
    return policy if extensions < max_extensions else "fail"
