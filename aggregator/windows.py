"""The asynchronous mode's sequence of version windows, and the updates held between two.

:class:`VersionWindows` makes each window from its predecessor (or, after a restart, from
the checkpoint's history: :func:`~aggregator.async_rounds.window_from_history`) and holds
updates that arrive while no window is open, for the next one (bounded: beyond it they are
answered ``no-round``, and their agents re-send them). In synchronous rounds it holds
nothing, and an update is late as soon as its round is closed. docs/async.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aggregator.async_rounds import AsyncSettings, VersionWindow, window_from_history
from aggregator.resume import Durability
from shared.mqtt.base import Inbound

# Updates held between two windows, at most, per update of the window (K).
HELD_PER_BUFFERED = 4


class VersionWindows:
    """The service's async windows (``settings`` None: synchronous rounds, none)."""

    def __init__(
        self,
        settings: AsyncSettings | None,
        min_clients: int,
        initial_hash: str,
        durable: Durability | None,
    ) -> None:
        """``initial_hash``: version 0, round 1's base; ``durable``: the checkpoint's
        history, for the first window after a restart."""
        self.settings = settings
        self.min_clients = min_clients
        self.initial_hash = initial_hash
        self.durable = durable
        self.last: VersionWindow | None = None  # the last window (its successor comes next)
        self.held: list[Inbound] = []

    def next(self, r: int, model_hash: str, deadline: float, started: float) -> VersionWindow:
        """Version window ``r`` on ``model_hash`` (after a restart: from the checkpoint's
        history)."""
        assert self.settings is not None
        last = self.last
        if last is not None and last.round_id == r - 1:
            window = last.successor(r, model_hash, deadline, started)
        else:
            history = self.durable.history if self.durable is not None else []
            window = window_from_history(
                history, self.settings, r, model_hash, self.min_clients, deadline, started,
                self.initial_hash,
            )  # fmt: skip
        self.last = window
        return window

    def last_closed(self, round_id: int) -> int:
        """The last round an update may no longer be counted for, ``round_id`` applied
        (async: the rounds within max_staleness of the next window still may)."""
        if self.settings is None:
            return round_id
        return round_id - self.settings.max_staleness

    def hold(self, item: Inbound) -> bool:
        """Keep an update that came between two windows for the next; False without room."""
        room = 0 if self.settings is None else HELD_PER_BUFFERED * self.settings.buffer
        if len(self.held) >= room:
            return False
        self.held.append(item)
        return True

    def release(self, still_open: Callable[[], bool]) -> Iterator[Inbound]:
        """The held updates, oldest first, while ``still_open()``; the rest stay held."""
        held, self.held = self.held, []
        for n, waiting in enumerate(held):
            if not still_open():  # K reached: the rest wait for the next window
                self.held = held[n:] + self.held
                return
            yield waiting
