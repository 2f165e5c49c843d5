"""Chunk messages from paho's network thread to whole payloads: locked, swept, reported.

:class:`ChunkReceiver` is the transport's shell around the pure
:class:`~shared.mqtt.reassembly.Reassembler`:

- a lock, because paho's network thread offers chunks while the sweeper thread expires them;
- a sweep every ``sweep_every_s``, so an incomplete transfer is dropped on time even when no
  other chunk arrives (a federation whose updates are never chunked sends none);
- one log line per sender per ``report_every_s`` for everything refused or dropped, never one
  per chunk: a flood of bad chunks cannot flood the log;
- the retained-message policy: on topics that must never be retained (``never_retained``,
  e.g. a device's update), a retained message is neither reassembled nor handed on, and is
  cleared from the broker (``clear`` publishes an empty retained message on its topic), so a
  device cannot park data in the broker for every future subscriber.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shared.mqtt.chunking import ChunkError
from shared.mqtt.reassembly import Reassembler, ReassemblyLimits, SenderReport, topic_is_sender
from shared.protocol.topics import split_chunk_topic

log = logging.getLogger(__name__)


def _never(topic: str) -> bool:
    return False


def _no_clear(topic: str) -> None:
    return None


class ChunkReceiver:
    """Turns inbound messages into what the inbox gets: whole payloads, on their base topic."""

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        *,
        sender_of: Callable[[str], str] = topic_is_sender,
        never_retained: Callable[[str], bool] = _never,
        clear: Callable[[str], None] = _no_clear,
        clock: Callable[[], float] = time.monotonic,
        sweep_every_s: float = 1.0,
        report_every_s: float = 10.0,
    ) -> None:
        self.reassembler = Reassembler(limits, sender_of=sender_of, clock=clock)
        self.never_retained = never_retained
        self.clear = clear
        self.clock = clock
        self.sweep_every_s = sweep_every_s
        self.report_every_s = report_every_s
        self._lock = threading.Lock()
        self._last_report = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def receive(self, topic: str, payload: bytes, retained: bool) -> tuple[str, bytes] | None:
        """``(topic, payload)`` to hand on for one inbound message, or None (nothing yet).

        A chunk yields its transfer's whole payload on the base topic once complete. A
        refused chunk yields None; it is counted for the sender's next report line.
        """
        chunk = split_chunk_topic(topic)
        base = topic if chunk is None else chunk[0]
        if retained and self.never_retained(base):
            if payload:  # empty: a clearance (ours, say), nothing left to clear
                self.clear(topic)
                with self._lock:
                    sender = self.reassembler.sender_of(base)
                    self.reassembler.tally.add(sender, "retained", f"cleared {topic}")
            return None
        if chunk is None:
            return topic, payload
        if not payload:  # a cleared retained chunk
            return None
        with self._lock:
            try:
                whole = self.reassembler.offer(base, payload)
            except ChunkError:
                return None  # counted in the tally: sweep() reports it
        return None if whole is None else (base, whole)

    def sweep(self) -> list[SenderReport]:
        """Expire overdue transfers; every ``report_every_s``, log and return the reports."""
        with self._lock:
            self.reassembler.expire()
            now = self.clock()
            if now - self._last_report < self.report_every_s:
                return []
            self._last_report = now
            reports = self.reassembler.tally.drain()
        for report in reports:
            log.warning("chunks refused or dropped since the last report: %s", report.line())
        return reports

    def start(self, name: str) -> None:
        """Sweep every ``sweep_every_s`` on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{name}-chunk-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sweeper thread (a last sweep reports what is still counted)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=5.0)
        self._last_report = float("-inf")
        self.sweep()

    def _run(self) -> None:
        while not self._stop.wait(self.sweep_every_s):
            self.sweep()
