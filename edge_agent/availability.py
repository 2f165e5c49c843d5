"""When a device is on-line: ``--online F`` as random spells (a heterogeneous fleet to test on).

A device on-line a fraction F of the time, in spells: on-line spells last Exp(mean ``spell_s``)
seconds, off-line ones Exp(mean ``spell_s``·(1 − F)/F), so the long-run on-line fraction is F.
The device starts on-line (it says so with its status), and the draws come from a generator
seeded by its client id: the same device has the same pattern in every run, whichever mode
(synchronous or asynchronous) the federation runs in. Pure: time comes in as an argument.
"""

from __future__ import annotations

import zlib

import numpy as np


class OnlineSpells:
    """The on-line/off-line pattern of one device."""

    def __init__(self, fraction: float, spell_s: float, seed: str, start: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"online fraction must be in (0, 1], got {fraction}")
        if not spell_s > 0:
            raise ValueError(f"online spell must be > 0 seconds, got {spell_s}")
        self.fraction = fraction
        self.mean_on = spell_s
        self.mean_off = spell_s * (1 - fraction) / fraction
        self.rng = np.random.default_rng(zlib.crc32(seed.encode()))
        self.online = True
        self.until = start + self._draw()

    def _draw(self) -> float:
        mean = self.mean_on if self.online else self.mean_off
        return float(self.rng.exponential(mean)) if mean > 0 else float("inf")

    def at(self, now: float) -> bool:
        """Whether the device is on-line at ``now`` (never earlier than the last call)."""
        if self.fraction >= 1:
            return True
        while now >= self.until:
            self.online = not self.online
            self.until += self._draw()
        return self.online
