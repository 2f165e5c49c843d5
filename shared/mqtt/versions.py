"""Which MQTT protocol version to speak: ``5``, ``3.1.1``, or ``auto`` (5, else 3.1.1).

Many brokers in the field speak only MQTT 3.1.1 (amqtt, older RabbitMQ MQTT plugins, Azure
IoT Hub), and they refuse an MQTT 5 CONNECT in one of three ways, all seen here:

- a CONNACK with 3.1.1 return code 1, "unacceptable protocol version" (paho reports it as
  the MQTT 5 reason code 0x84, "Unsupported protocol version");
- closing the connection without any CONNACK;
- silence: amqtt 0.12 reads an MQTT 5 CONNECT that carries a will or a user name with its
  3.1.1 parser, waits for bytes that never come and answers nothing at all.

:class:`VersionNegotiation` is the pure state machine behind ``auto``: it starts with 5 and
switches on any of those outcomes, until an attempt gets an answer in the version it spoke
(accepted, or refused for another reason such as credentials): from then on that version is
settled and reconnects keep it. :class:`ConnectAttempt` carries one attempt's outcome from
paho's network thread to the thread waiting in ``start()``. No paho here.
"""

from __future__ import annotations

import enum
import threading

AUTO = "auto"
V5 = "5"
V311 = "3.1.1"
#: The values of the ``mqtt_version`` setting and the ``--mqtt-version`` flag.
MQTT_VERSIONS = (AUTO, V5, V311)

#: MQTT 5 CONNACK reason code "Unsupported Protocol Version"; paho also reports a 3.1.1
#: broker's return code 1 ("unacceptable protocol version") with it.
UNSUPPORTED_PROTOCOL_VERSION = 0x84

# paho turns a 3.1.1 CONNACK return code into the MQTT 5 reason code of the same meaning;
# refusal messages name the code the broker really sent.
_RETURN_CODES_311 = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


class Outcome(enum.Enum):
    """What became of one CONNECT (the value says what the broker did, for the log)."""

    ACCEPTED = "accepted an MQTT {v} CONNECT"
    VERSION_REFUSED = "refused MQTT {v} (unsupported protocol version)"
    # Refused for another reason (credentials, client id): the version itself is spoken.
    REFUSED = "refused an MQTT {v} CONNECT"
    CLOSED = "closed the connection on an MQTT {v} CONNECT"
    SILENT = "did not answer an MQTT {v} CONNECT"


def check_mqtt_version(value: str) -> str:
    """``value`` when it is one of :data:`MQTT_VERSIONS`; ValueError otherwise."""
    if value not in MQTT_VERSIONS:
        raise ValueError(f"mqtt-version must be one of: {', '.join(MQTT_VERSIONS)} (got {value!r})")
    return value


def connack_outcome(reason_code: int) -> Outcome:
    """The outcome a CONNACK with ``reason_code`` (paho's MQTT 5 numbering) means."""
    if reason_code == 0:
        return Outcome.ACCEPTED
    if reason_code == UNSUPPORTED_PROTOCOL_VERSION:
        return Outcome.VERSION_REFUSED
    return Outcome.REFUSED


def return_code_311(reason_code: int) -> int | None:
    """The MQTT 3.1.1 CONNACK return code paho reported as ``reason_code``, if any."""
    return _RETURN_CODES_311.get(reason_code)


class VersionNegotiation:
    """The version to put in the next CONNECT, from the setting and the outcomes so far."""

    def __init__(self, setting: str) -> None:
        self.setting = check_mqtt_version(setting)
        self.version = V311 if setting == V311 else V5
        # A fixed version is never changed; ``auto`` settles on the first answer in kind.
        self.settled = setting != AUTO
        #: What made the last switch, e.g. "did not answer an MQTT 5 CONNECT".
        self.fallback_reason: str | None = None

    def record(self, outcome: Outcome) -> bool:
        """Account for one attempt; True when the next attempt speaks the other version."""
        if self.settled:
            return False
        if outcome in (Outcome.ACCEPTED, Outcome.REFUSED):
            self.settled = True
            return False
        # The broker did not answer in this version: try the other one (and back again,
        # should that fail the same way, until the connect timeout).
        self.fallback_reason = outcome.value.format(v=self.version)
        self.version = V311 if self.version == V5 else V5
        return True

    def failure(self, refused: str | None) -> str:
        """Why no connection was made (``refused``: the last refusal), for the timeout error."""
        why = f"refused: {refused}" if refused else "no answer"
        if self.fallback_reason is not None:
            return f"{why}; tried MQTT 5 and 3.1.1: the broker {self.fallback_reason}"
        if refused is None and self.setting == V5:
            return f"{why}; a 3.1.1-only broker may not answer MQTT 5: try --mqtt-version auto"
        return why

    def describe(self, max_chunk_bytes: int) -> str:
        """How the connection speaks, for the log line after a successful connect."""
        text = f"MQTT {self.version}"
        if self.fallback_reason is not None:
            text += f" (auto: the broker {self.fallback_reason})"
        if self.version == V311:
            # What degrades: see docs/brokers.md.
            text += (
                f"; no broker packet limit in 3.1.1: payloads over {max_chunk_bytes} bytes "
                "(max-chunk-bytes) are chunked"
            )
        return text


class ConnectAttempt:
    """One CONNECT's outcome, set once on paho's network thread and awaited by ``start()``."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.outcome: Outcome | None = None

    def settle(self, outcome: Outcome) -> bool:
        """Record ``outcome`` unless one is recorded already; True when this one counted."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome = outcome
        self._done.set()
        return True

    def wait(self, timeout: float) -> Outcome:
        """The outcome, or SILENT (settled as such) when nothing came within ``timeout``."""
        if not self._done.wait(max(0.0, timeout)):
            self.settle(Outcome.SILENT)
        return self.outcome or Outcome.SILENT  # settled above, or by the network thread
