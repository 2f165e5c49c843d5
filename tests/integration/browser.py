"""Helpers for the dashboard's browser tests: the system Chromium driven by Playwright, and
what the page's WebSocket carried (MQTT packets decoded from its frames).

Playwright never downloads a browser here: it drives Debian's ``chromium`` (or
``$FEDMQ_CHROMIUM``). Without either the tests are skipped locally and fail under CI=true.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import running_in_ci

CHROMIUM_ENV = "FEDMQ_CHROMIUM"
# MQTT control packet types (the high nibble of a packet's first byte).
PUBLISH, SUBSCRIBE = 3, 8


def chromium_path() -> str | None:
    """``$FEDMQ_CHROMIUM``, else Debian's ``chromium`` on PATH or in /usr/bin."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def require_browser() -> str:
    """The Chromium executable; skip without it or without Playwright, fail under CI=true."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("playwright is not installed (pip install -e '.[dev]')")
    path = chromium_path()
    if path is None:
        problems.append(f"no chromium (apt-get install chromium, or set ${CHROMIUM_ENV})")
    if problems:
        why = "; ".join(problems)
        if running_in_ci():
            pytest.fail(f"CI=true but the browser tests cannot run: {why}", pytrace=False)
        pytest.skip(f"browser test needs {why}")
    assert path is not None
    return path


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """MQTT's variable byte integer at ``data[i]``: (value, index after it)."""
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def packets(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """(packet type, body) of each whole MQTT packet in a byte stream (a torn tail is left)."""
    i = 0
    while i < len(stream):
        kind = stream[i] >> 4
        try:
            length, start = _varint(stream, i + 1)
        except IndexError:
            return
        if start + length > len(stream):
            return
        yield kind, stream[start : start + length]
        i = start + length


def subscribe_filters(body: bytes) -> list[str]:
    """The topic filters of an MQTT 5 SUBSCRIBE packet's body."""
    props, i = _varint(body, 2)  # after the packet identifier
    i += props
    filters = []
    while i < len(body):
        n = int.from_bytes(body[i : i + 2], "big")
        filters.append(body[i + 2 : i + 2 + n].decode())
        i += 2 + n + 1  # the filter, then its options byte
    return filters


def publish_topic(body: bytes) -> str:
    """The topic of a PUBLISH packet's body."""
    n = int.from_bytes(body[:2], "big")
    return body[2 : 2 + n].decode()


@dataclass
class SocketLog:
    """Every byte the page's WebSockets sent and received, per socket and direction."""

    sent: list[bytearray] = field(default_factory=list)
    received: list[bytearray] = field(default_factory=list)

    def watch(self, ws: Any) -> None:
        """Record one WebSocket (Playwright's ``page.on("websocket")`` callback)."""
        out, inb = bytearray(), bytearray()
        self.sent.append(out)
        self.received.append(inb)
        ws.on("framesent", lambda payload: out.extend(_bytes(payload)))
        ws.on("framereceived", lambda payload: inb.extend(_bytes(payload)))

    def subscriptions(self) -> list[str]:
        """Every topic filter the page subscribed to, over all its connections."""
        return [
            f
            for stream in self.sent
            for kind, body in packets(bytes(stream))
            if kind == SUBSCRIBE
            for f in subscribe_filters(body)
        ]

    def published_to_page(self) -> list[str]:
        """The topic of every message the broker delivered to the page."""
        return [
            publish_topic(body)
            for stream in self.received
            for kind, body in packets(bytes(stream))
            if kind == PUBLISH
        ]


def _bytes(payload: str | bytes) -> bytes:
    return payload.encode() if isinstance(payload, str) else payload
