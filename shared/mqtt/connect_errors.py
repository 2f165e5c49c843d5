"""One-line, actionable explanations of why a broker connection failed.

paho reports connection failures as raw socket/TLS exceptions or MQTT reason codes; an
operator on a Pi needs one log line that says what to fix, not a traceback per retry.
"""

from __future__ import annotations

import socket
import ssl

from paho.mqtt.reasoncodes import ReasonCode

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


def describe_refusal(reason: ReasonCode | str) -> str:
    """Explain a CONNACK failure reason code."""
    text = str(reason)
    if text.lower() in _AUTH_REASONS:
        return (
            f"{text}: check --username/--password (and the client certificate) "
            "against the broker's password file"
        )
    return text
