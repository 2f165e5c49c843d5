"""A scripted stand-in for a broker's CONNECT handling, on a loopback socket (no broker).

It reads each connection's CONNECT, notes its protocol level (5 = MQTT 5, 4 = MQTT 3.1.1)
and reacts as the script says for that level: accept (CONNACK 0), refuse the version the
way a 3.1.1 broker does (CONNACK return code 1), close the connection, or stay silent (as
amqtt does with an MQTT 5 CONNECT that carries a will). After accepting, it answers
SUBSCRIBE with a SUBACK carrying ``suback_code`` for every topic.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from typing import Literal

Reaction = Literal["accept", "refuse-version", "close", "silent"]

CONNACK_ACCEPTED = bytes([0x20, 0x02, 0x00, 0x00])
CONNACK_ACCEPTED_5 = bytes([0x20, 0x03, 0x00, 0x00, 0x00])  # + an empty property list
CONNACK_BAD_VERSION = bytes([0x20, 0x02, 0x00, 0x01])  # 3.1.1: unacceptable protocol version
_CONNECT, _SUBSCRIBE, _DISCONNECT = 0x10, 0x80, 0xE0


class ScriptedBroker:
    """Accepts connections on 127.0.0.1 and reacts to each CONNECT by its protocol level."""

    def __init__(self, script: Mapping[int, Reaction], suback_code: int = 0x01) -> None:
        self.script = dict(script)
        self.suback_code = suback_code
        self.levels: list[int] = []  # protocol level of every CONNECT, in order
        self.subscribes: list[bytes] = []  # body of every SUBSCRIBE
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self._server.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._server.close()
        for conn in self._conns:
            conn.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed by __exit__
            self._conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            while True:
                kind, body = _read_packet(conn)
                if kind == _CONNECT:
                    if not self._connack(conn, body):
                        return
                elif kind == _SUBSCRIBE:
                    self.subscribes.append(body)
                    self._suback(conn, body)
                elif kind == _DISCONNECT:
                    return
        except (OSError, EOFError):
            return

    def _connack(self, conn: socket.socket, body: bytes) -> bool:
        """React to a CONNECT; False when the connection is over (closed or left silent)."""
        level = body[6]  # after the protocol name: 00 04 "MQTT"
        self.levels.append(level)
        reaction = self.script.get(level, "close")
        if reaction == "accept":
            conn.sendall(CONNACK_ACCEPTED_5 if level == 5 else CONNACK_ACCEPTED)
            return True
        if reaction == "refuse-version":
            conn.sendall(CONNACK_BAD_VERSION)
        if reaction in ("refuse-version", "close"):
            conn.close()
        return False  # "silent": never answer; the client gives up on its own

    def _suback(self, conn: socket.socket, body: bytes) -> None:
        packet_id, topics, i = body[:2], 0, 2
        if self.levels[-1] == 5:
            i += 1 + body[i]  # properties: only empty ones are expected here
        while i < len(body):
            i += 2 + int.from_bytes(body[i : i + 2], "big") + 1  # topic, then options byte
            topics += 1
        codes = bytes([self.suback_code] * topics)
        props = b"\x00" if self.levels[-1] == 5 else b""
        rest = packet_id + props + codes
        conn.sendall(bytes([0x90, len(rest)]) + rest)


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet: (packet type with flags cleared, body)."""
    first = _read(conn, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read(conn, 1)[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first & 0xF0, _read(conn, length)


def _read(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out
