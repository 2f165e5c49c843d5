"""What makes the aggregator crash-safe: checkpoint + journal, and the starved-round policy.

:class:`Durability` is the service's one handle on its state directory: it restores the last
checkpoint and the open round's journal at start, journals announcements and accepted
updates (before their receipts), and checkpoints each applied round (then drops its
journal). :func:`starved_action` is the pure policy for a round below quorum at its deadline.

It also keeps the run epoch (:func:`resolve_run`): written into every announcement record and
checkpoint, so a restarted aggregator continues the run it was in (agents see the same run
and rounds), while a fresh state directory, or none, starts a new run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.checkpoint import Checkpoint, CheckpointError, CheckpointStore, config_fingerprint
from aggregator.journal import JournaledRound, RoundJournal
from aggregator.rounds import RoundState

log = logging.getLogger("fedmq.aggregator.resume")

Tensors = dict[str, np.ndarray]

# Exit code of an aggregator whose round stayed below quorum after every extension/retry.
EXIT_STARVED = 3
# Exit code of an aggregator that stopped because one more round would exceed its privacy
# budget (the model it published last is final).
EXIT_BUDGET = 4


@dataclass(frozen=True)
class Restored:
    """The state a restarted aggregator continues from."""

    checkpoint: Checkpoint | None
    open_round: JournaledRound | None  # the round after the checkpoint, if it was announced
    run: int | None = None  # the run they belong to (None: nothing saved, or saved before runs)


class Durability:
    """Checkpoint store + round journal in one state directory."""

    def __init__(self, state_dir: Path, cfg: object) -> None:
        self.store = CheckpointStore(state_dir)
        self.journal = RoundJournal(state_dir)
        self.fingerprint = config_fingerprint(cfg)
        self.history: list[dict[str, Any]] = []
        self.run: int | None = None  # written into announcements and checkpoints

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
        saved = ckpt.run if ckpt is not None else None
        if saved is None and jr is not None and isinstance(jr.announce.get("run"), int):
            saved = jr.announce["run"]  # crashed in round 1: no checkpoint yet
        return Restored(ckpt, jr, saved)

    def announced(self, state: RoundState, rng: np.random.Generator) -> None:
        """Journal an announcement before it is published."""
        self.journal.announce(
            state.round_id,
            state.base_hash,
            sorted(state.selected),
            state.deadline,
            state.extensions,
            rng_state(rng),
            self.run,
        )

    def accepted(
        self, round_id: int, client_id: str, num_samples: int, payload: bytes, site: bool = False
    ) -> None:
        """Journal an accepted update (``site``: a site's partial) before its receipt is sent."""
        self.journal.accept(round_id, client_id, num_samples, payload, site)

    def applied(
        self,
        state: RoundState,
        params: Tensors,
        model_hash: str,
        rng: np.random.Generator,
        residual: Tensors | None = None,
        strategy: tuple[Tensors, dict[str, Any]] | None = None,
        window: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint round ``state.round_id`` as applied, then drop its journal.

        ``strategy``: the strategy's state after the round (RoundStrategy.state());
        ``window``: an async version window's entry (VersionWindow.history_entry).
        """
        strategy_tensors, strategy_doc = strategy if strategy is not None else ({}, None)
        entry = {"round": state.round_id, "accepted": dict(state.accepted), **(window or {})}
        self.history.append(entry)
        self.store.save(
            Checkpoint(
                round=state.round_id,
                params=params,
                model_hash=model_hash,
                rng_state=rng_state(rng),
                fingerprint=self.fingerprint,
                history=self.history,
                residual=residual,
                run=self.run,
                strategy_tensors=strategy_tensors,
                strategy=strategy_doc,
            )
        )
        self.journal.clear_through(state.round_id)


def new_run_epoch(now: float) -> int:
    """A new run's epoch: the start time in milliseconds, larger than any earlier run's."""
    return int(now * 1000)


def resolve_run(configured: int | None, saved: int | None, new: int) -> int:
    """The run to continue (``saved``), or to start: ``configured`` (``--run``), else ``new``.

    Raises CheckpointError when ``--run`` names another run than the saved state's: resuming
    would mix two runs; a new run needs a new ``--state-dir``.
    """
    if saved is None:
        return configured if configured is not None else new
    if configured is not None and configured != saved:
        raise CheckpointError(
            f"--run {configured} but the state directory holds run {saved}: omit --run to "
            "resume it, or give another --state-dir to start a new run"
        )
    return saved


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able state of ``rng``'s bit generator."""
    return dict(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore a state saved by :func:`rng_state`."""
    rng.bit_generator.state = state


def starved_action(extensions: int, policy: str, max_extensions: int) -> str:
    """``extend`` / ``retry`` (the policy) while extensions remain, then ``fail``."""
    return policy if extensions < max_extensions else "fail"
