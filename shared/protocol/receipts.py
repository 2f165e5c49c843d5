"""Receipt codes: what the aggregator's answer to one update means, in a word a program reads.

A :class:`~shared.protocol.messages.Receipt` carries a ``code`` from :data:`ReceiptCode` beside
its human ``reason``. Agents decide on the code (counted? final? is the mass owed again?);
the reason is for people and for agents older than the code, which match on its text — so the
aggregator keeps those texts unchanged.

Compatibility, both ways:

- a receipt from an aggregator older than the code has none: :func:`code_from_legacy_reason`
  derives it from the reason text; it is the only place that knows those texts;
- a receipt from a newer aggregator may carry a code this version does not know:
  :func:`known_code` reads an unknown refusal as ``malformed`` (final, not counted, not owed),
  so an old agent neither floods the aggregator with re-sends nor counts mass twice.
"""

from __future__ import annotations

from typing import Literal, get_args

ReceiptCode = Literal[
    "accepted",  # the update entered the round's sum
    "duplicate",  # an earlier copy of this client's update was already counted this round
    "late",  # its round is closed
    "stale-base",  # trained on another base model than the round's
    "wrong-round",  # its round has not started here (yet)
    "not-selected",  # the client is not among the round's selected clients
    "no-round",  # the aggregator has no round open (it is starting or waiting for agents)
    "malformed",  # undecodable or invalid frame, or frame and topic disagree
    "too-large",  # the frame is over the round's max_update_bytes
    "over-norm",  # the delta's L2 norm is over the operator's bound
    "non-finite",  # the delta's values are not finite, or would make the global model overflow
    "too-many-samples",  # num_samples is over the device's declared count or the configured maximum
    "rate-limited",  # the client sent more update messages than its budget: not read
    # the device's model is not the aggregator's: its architecture fingerprint (or its update's
    # tensor names/shapes) differs; the reason names the fingerprints
    "wrong-model",
    # asynchronous mode (docs/async.md): its base version is more than max_staleness behind
    "stale",
    # asynchronous mode: this device already has an update counted in the open version
    # window; re-sent after the next version, it counts there (not final)
    "busy",
]
RECEIPT_CODES: tuple[ReceiptCode, ...] = get_args(ReceiptCode)

# Leading words of the aggregator's reason texts (aggregator/rounds.py, aggregator/intake.py,
# aggregator/update_bounds.py), first match wins. Every other rejection is an invalid frame.
# ("wrong model:" is newer than the codes: an aggregator writing it also sends its code.)
_LEGACY_PREFIXES: tuple[tuple[str, ReceiptCode], ...] = (
    ("duplicate:", "duplicate"),
    ("late:", "late"),
    ("stale base model", "stale-base"),
    ("wrong round:", "wrong-round"),
    ("not selected", "not-selected"),
    ("no round is open", "no-round"),
    ("update L2 norm", "over-norm"),
    ("non-finite:", "non-finite"),
    ("too many samples:", "too-many-samples"),
    ("undecodable: frame of ", "too-large"),  # "frame of N bytes exceeds the limit of M"
    ("rate limited:", "rate-limited"),
    ("wrong model:", "wrong-model"),
    ("stale:", "stale"),
    ("busy:", "busy"),
)


def known_code(code: str, status: str) -> ReceiptCode:
    """``code`` when this version knows it; otherwise what an unknown code must mean."""
    for known in RECEIPT_CODES:
        if code == known:
            return known
    return "accepted" if status == "accepted" else "malformed"


def code_from_legacy_reason(status: str, reason: str) -> ReceiptCode:
    """The code of a receipt that has none (an older aggregator), from its status and reason.

    The compatibility path: an aggregator with codes sends them and this is not consulted.
    A rejection whose text is not recognised is ``malformed`` (final, not counted, not owed),
    which is what an agent matching on text did with it too.
    """
    if status == "accepted":
        return "accepted"
    for prefix, code in _LEGACY_PREFIXES:
        if reason.startswith(prefix):
            return code
    return "malformed"
