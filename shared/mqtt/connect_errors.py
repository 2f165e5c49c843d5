"""One-line, actionable explanations of why a broker connection failed.

paho reports connection failures as raw socket/TLS exceptions or MQTT reason codes; an
operator on a Pi needs one log line that says what to fix, not a traceback per retry.
"""

from __future__ import annotations

import socket
import ssl

from paho.mqtt.reasoncodes import ReasonCode

from shared.mqtt.versions import UNSUPPORTED_PROTOCOL_VERSION, V5, V311, return_code_311

_AUTH_REASONS = ("bad user name or password", "not authorized", "bad authentication method")


def describe_connect_error(exc: BaseException, address: str) -> str:
    """Explain a socket/TLS exception raised while connecting to ``address``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return (
            f"TLS certificate of {address} not trusted ({detail}): is --ca-file the CA that "
            "signed the broker certificate, and is the host name in its SAN?"
        )
    if isinstance(exc, ssl.SSLError):
        detail = exc.reason or str(exc)
        return (
            f"TLS handshake with {address} failed ({detail}): is the port a TLS listener, "
            "and does the broker require a client certificate (--cert-file/--key-file)?"
        )
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {address} refused: is the broker running and listening there?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker host of {address}: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"connection to {address} timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot connect to {address}: {exc.strerror}"
    return f"cannot connect to {address}: {type(exc).__name__}: {exc}"


def describe_refusal(reason: ReasonCode | str, version: str = V5) -> str:
    """Explain a CONNACK failure reason code received while speaking MQTT ``version``.

    Under 3.1.1 the broker sent a return code (1-5), which paho reports as the MQTT 5
    reason code of the same meaning: the message names the code really sent.
    """
    text = str(reason)
    value = reason.value if isinstance(reason, ReasonCode) else None
    if version == V311 and value is not None and return_code_311(value) is not None:
        text += f" (MQTT 3.1.1 return code {return_code_311(value)})"
    if value == UNSUPPORTED_PROTOCOL_VERSION:
        other = V311 if version == V5 else V5
        return (
            f"{text}: the broker does not speak MQTT {version}; try --mqtt-version {other} or auto"
        )
    if str(reason).lower() in _AUTH_REASONS:
        return (
            f"{text}: check --username/--password (and the client certificate) "
            "against the broker's password file"
        )
    return text
