"""Every MQTT topic of the fedmq protocol, built and parsed in one place.

Layout (protocol version in the namespace, like Sparkplug's ``spBv1.0``)::

    fl/v1/{fed}/aggregator/status          retained JSON: running | finished | offline (will)
    fl/v1/{fed}/global/meta                retained JSON: round, model hash, size, arch
    fl/v1/{fed}/global/model               retained binary frame: the full global model
    fl/v1/{fed}/global/delta               retained binary frame: quantized step from the
                                           previous global model to the current one
    fl/v1/{fed}/global/onnx                retained ONNX frame of the global model (inference)
    fl/v1/{fed}/round/{r}/start            retained JSON: round announcement (cleared at its close)
    fl/v1/{fed}/round/{r}/update/{cid}     binary frame: an agent's compressed delta (QoS 1)
    fl/v1/{fed}/round/{r}/receipt/{cid}    JSON: accepted | rejected + reason (QoS 1)
    fl/v1/{fed}/round/{r}/decision         JSON: applied | extended | retried | failed | discarded
    <any topic>/chunk/{i}                  one chunk of a payload over the packet limit
    fl/v1/{fed}/agents/{cid}/status        retained JSON: online | training | offline (will)
    fl/v1/{fed}/metrics                    JSON per applied round (latest retained)
    fl/v1/{fed}/infer/{cid}-infer/request/{req}
                                           JSON/npz inference request from requester {req} to
                                           device {cid}'s inference server
    fl/v1/{fed}/infer/{cid}-infer/response/{req}
                                           JSON answer of {cid}'s inference server to {req}
    fl/v1/{fed}/sites/{site}/round/{r}/partial
                                           binary frame: site {site}'s partial aggregate of
                                           round {r} (one weighted sum + total samples; QoS 1)
    fl/v1/{fed}/sites/{site}/round/{r}/receipt
                                           JSON: the central aggregator's receipt for it
    fl/v1/{fed}/sites/{site}/status        retained JSON: the site aggregator's status (will)
    fl/v1/{fed}/sites/{site}/bridge        retained "1" | "0": the site broker's bridge to the
                                           central broker is up | down (Mosquitto writes it)

Sites (docs/sites.md): a site runs its own broker, bridged to the central one. Only the
topics of :meth:`Topics.site_downlink` (central -> site) and :meth:`Topics.site_uplink`
(site -> central) cross the bridge; nothing a device publishes is among them.

``{cid}-infer`` is the inference server's own identity (:func:`inference_server_id`): its
client id and, on a provisioned broker, its login, so the server never shares a connection
with its device's training agent. ``{req}`` is the requester's broker login; the ACL binds
both levels to the logins, so neither can be forged. Client ids ending in ``-infer`` name
inference servers and never train: the training topics refuse them.

No other module writes a topic literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOL = "fl/v1"

# Federation names and client ids become topic levels: forbid MQTT wildcards, separators
# and anything a shell user would have to quote, so ACL patterns (%c) stay predictable.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_ROUND_RE = re.compile(r"0|[1-9][0-9]{0,8}")
MAX_ROUND = 999_999_999
# A device's inference server is a client of its own: ``{cid}{INFERENCE_SUFFIX}``.
INFERENCE_SUFFIX = "-infer"
MAX_NAME_CHARS = 64


class TopicError(ValueError):
    """A topic or topic component is not valid for the fedmq protocol."""


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a legal federation name / client id, else raise TopicError."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise TopicError(
            f"invalid {kind} {value!r}: use 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return value


def validate_agent_id(client_id: str) -> str:
    """A legal client id of a training agent (a device): not an inference server's id.

    Ids ending in :data:`INFERENCE_SUFFIX` belong to inference servers, each provisioned
    with a login of its own; refusing them on the training topics keeps that second
    identity of a device from training (one device, one update per round).
    """
    validate_name("client id", client_id)
    if client_id.endswith(INFERENCE_SUFFIX):
        raise TopicError(
            f"invalid client id {client_id!r}: ids ending in {INFERENCE_SUFFIX!r} name "
            "inference servers, which never train"
        )
    return client_id


def inference_server_id(client_id: str) -> str:
    """Client id (and provisioned login) of device ``client_id``'s inference server."""
    validate_agent_id(client_id)
    if len(client_id) + len(INFERENCE_SUFFIX) > MAX_NAME_CHARS:
        longest = MAX_NAME_CHARS - len(INFERENCE_SUFFIX)
        raise TopicError(
            f"invalid client id {client_id!r}: at most {longest} characters leave room for "
            f"its inference server's id ({client_id}{INFERENCE_SUFFIX})"
        )
    return client_id + INFERENCE_SUFFIX


def device_of_server(server_id: str) -> str:
    """The device whose inference server is ``server_id``; TopicError for any other id."""
    validate_name("inference server id", server_id)
    device = server_id.removesuffix(INFERENCE_SUFFIX)
    if device == server_id:
        raise TopicError(f"{server_id!r} is not an inference server id (*{INFERENCE_SUFFIX})")
    return validate_agent_id(device)


@dataclass(frozen=True)
class Topics:
    """Topic builder for one federation."""

    federation: str

    def __post_init__(self) -> None:
        validate_name("federation", self.federation)

    @property
    def root(self) -> str:
        """Prefix of every topic of this federation."""
        return f"{PROTOCOL}/{self.federation}"

    @property
    def all(self) -> str:
        """Wildcard subscription covering the whole federation (for monitors)."""
        return f"{self.root}/#"

    @property
    def aggregator_status(self) -> str:
        """Retained aggregator life-cycle status (with a last will)."""
        return f"{self.root}/aggregator/status"

    @property
    def global_meta(self) -> str:
        """Retained JSON description of the current global model."""
        return f"{self.root}/global/meta"

    @property
    def global_model(self) -> str:
        """Retained binary frame holding the current global model."""
        return f"{self.root}/global/model"

    @property
    def global_delta(self) -> str:
        """Retained binary frame: the current global model as a step from the previous one."""
        return f"{self.root}/global/delta"

    @property
    def global_onnx(self) -> str:
        """Retained ONNX frame of the current global model (inference without torch)."""
        return f"{self.root}/global/onnx"

    def infer_request(self, client_id: str, requester: str) -> str:
        """Where ``requester`` asks device ``client_id``'s inference server for predictions."""
        return f"{self._infer(client_id)}/request/{validate_name('requester', requester)}"

    def infer_request_any(self, client_id: str) -> str:
        """Subscription to every requester's requests to device ``client_id``'s server."""
        return f"{self._infer(client_id)}/request/+"

    def infer_response(self, client_id: str, requester: str) -> str:
        """Where device ``client_id``'s inference server answers ``requester``."""
        return f"{self._infer(client_id)}/response/{validate_name('requester', requester)}"

    def _infer(self, client_id: str) -> str:
        return f"{self.root}/infer/{inference_server_id(client_id)}"

    def site_partial(self, round_id: int, site: str) -> str:
        """Where site ``site`` publishes its partial aggregate of ``round_id``."""
        return f"{self.site_root(site)}/round/{_round(round_id)}/partial"

    def site_receipt(self, round_id: int, site: str) -> str:
        """Where the central aggregator acknowledges site ``site``'s partial of ``round_id``."""
        return f"{self.site_root(site)}/round/{_round(round_id)}/receipt"

    def site_receipt_any(self, site: str) -> str:
        """Subscription to the central aggregator's receipts for site ``site``, all rounds."""
        return f"{self.site_root(site)}/round/+/receipt"

    @property
    def site_partial_any(self) -> str:
        """Subscription to every site's partial aggregates (the central aggregator's)."""
        return f"{self.root}/sites/+/round/+/partial"

    @property
    def site_bridge_any(self) -> str:
        """Subscription to every site bridge's state (Mosquitto's notifications)."""
        return f"{self.root}/sites/+/bridge"

    @property
    def site_receipt_all(self) -> str:
        """Subscription to the central aggregator's receipts for every site's partials."""
        return f"{self.root}/sites/+/round/+/receipt"

    @property
    def site_status_any(self) -> str:
        """Subscription to every site aggregator's status (the central aggregator's)."""
        return f"{self.root}/sites/+/status"

    def site_status(self, site: str) -> str:
        """Retained status of site ``site``'s aggregator."""
        return f"{self.site_root(site)}/status"

    def site_bridge(self, site: str) -> str:
        """Retained ``1``/``0``: site ``site``'s bridge is connected (the bridge's notification)."""
        return f"{self.site_root(site)}/bridge"

    def site_downlink(self, site: str) -> list[str]:
        """The subscriptions a site's bridge imports from the central broker (central -> site).

        What the site's devices need to join and follow rounds (the signed global model, full
        and as a delta, its meta and ONNX form, announcements, decisions, the aggregator's
        signed status) and the central aggregator's receipts for this site's partials.
        Nothing else: no device's update, status or receipt, no other site's topics.
        """
        return [
            self.global_meta,
            *self.global_payloads,
            self.round_start_any,
            self.round_decision_any,
            self.aggregator_status,
            self.site_receipt_any(site),
        ]

    @property
    def global_payloads(self) -> list[str]:
        """Subscriptions to the retained binary frames of the current global model (full, as a
        delta, as ONNX) and their chunks: state whose latest retained copy is all a late
        subscriber needs (each new one supersedes the last)."""
        bases = [self.global_model, self.global_delta, self.global_onnx]
        return [t for base in bases for t in (base, _chunks(base))]

    def site_uplink(self, site: str) -> list[str]:
        """The subscriptions a site's bridge exports to the central broker (site -> central):
        the site's partials (and their chunks) and its aggregator's status, nothing else.
        The bridge's own state (:meth:`site_bridge`) reaches the central broker without a
        topic line (Mosquitto publishes it there itself)."""
        partial = f"{self.site_root(site)}/round/+/partial"
        return [partial, _chunks(partial), self.site_status(site)]

    def site_root(self, site: str) -> str:
        """Prefix of every topic of site ``site`` (``sites/{site}``)."""
        return f"{self.root}/sites/{validate_name('site name', site)}"

    @property
    def metrics(self) -> str:
        """Per-round metrics published by the aggregator."""
        return f"{self.root}/metrics"

    def round_start(self, round_id: int) -> str:
        """Announcement of round ``round_id``."""
        return f"{self.root}/round/{_round(round_id)}/start"

    @property
    def round_start_any(self) -> str:
        """Subscription to every round announcement."""
        return f"{self.root}/round/+/start"

    def update(self, round_id: int, client_id: str) -> str:
        """Where ``client_id`` publishes its delta for ``round_id``."""
        return f"{self.root}/round/{_round(round_id)}/update/{validate_agent_id(client_id)}"

    @property
    def update_any(self) -> str:
        """Subscription to every update of every round (the aggregator's)."""
        return f"{self.root}/round/+/update/+"

    def receipt(self, round_id: int, client_id: str) -> str:
        """Where the aggregator acknowledges ``client_id``'s update for ``round_id``."""
        cid = validate_agent_id(client_id)
        return f"{self.root}/round/{_round(round_id)}/receipt/{cid}"

    @property
    def receipt_any(self) -> str:
        """Subscription to every receipt of every round (for monitors)."""
        return f"{self.root}/round/+/receipt/+"

    def receipt_any_round(self, client_id: str) -> str:
        """Subscription to one client's receipts, all rounds."""
        return f"{self.root}/round/+/receipt/{validate_agent_id(client_id)}"

    def round_decision(self, round_id: int) -> str:
        """What the aggregator decided about ``round_id`` at its deadline (or on closing)."""
        return f"{self.root}/round/{_round(round_id)}/decision"

    @property
    def round_decision_any(self) -> str:
        """Subscription to every round's decision."""
        return f"{self.root}/round/+/decision"

    def agent_status(self, client_id: str) -> str:
        """Retained presence/status of one agent."""
        return f"{self.root}/agents/{validate_agent_id(client_id)}/status"

    @property
    def agent_status_any(self) -> str:
        """Subscription to every agent's status."""
        return f"{self.root}/agents/+/status"


@dataclass(frozen=True)
class ParsedTopic:
    """A topic of the protocol split into its parts."""

    federation: str
    kind: str  # aggregator_status | global_meta | global_model | global_delta | global_onnx |
    # metrics | round_start | update | receipt | decision | agent_status | infer_request |
    # infer_response | site_partial | site_receipt | site_status | site_bridge
    round_id: int | None = None
    client_id: str | None = None  # infer_*: the device whose inference server it is
    requester: str | None = None  # infer_request | infer_response: who asked
    site: str | None = None  # site_*: the site


def parse(topic: str) -> ParsedTopic:
    """Parse a concrete (wildcard-free) fedmq topic; raise TopicError when it is not one."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PROTOCOL:
        raise TopicError(f"not a {PROTOCOL} topic: {topic!r}")
    fed = validate_name("federation", parts[2])
    rest = parts[3:]
    simple = {
        ("aggregator", "status"): "aggregator_status",
        ("global", "meta"): "global_meta",
        ("global", "model"): "global_model",
        ("global", "delta"): "global_delta",
        ("global", "onnx"): "global_onnx",
        ("metrics",): "metrics",
    }
    if tuple(rest) in simple:
        return ParsedTopic(fed, simple[tuple(rest)])
    if len(rest) == 3 and rest[0] == "agents" and rest[2] == "status":
        return ParsedTopic(fed, "agent_status", client_id=validate_agent_id(rest[1]))
    if len(rest) == 4 and rest[0] == "infer" and rest[2] in ("request", "response"):
        cid = device_of_server(rest[1])
        who = validate_name("requester", rest[3])
        return ParsedTopic(fed, f"infer_{rest[2]}", client_id=cid, requester=who)
    if len(rest) >= 3 and rest[0] == "sites":
        return _parse_site(fed, rest, topic)
    if len(rest) >= 3 and rest[0] == "round":
        round_id = _parse_round(rest[1], topic)
        if len(rest) == 3 and rest[2] == "start":
            return ParsedTopic(fed, "round_start", round_id=round_id)
        if len(rest) == 3 and rest[2] == "decision":
            return ParsedTopic(fed, "decision", round_id=round_id)
        if len(rest) == 4 and rest[2] in ("update", "receipt"):
            cid = validate_agent_id(rest[3])
            return ParsedTopic(fed, rest[2], round_id=round_id, client_id=cid)
    raise TopicError(f"unknown fedmq topic: {topic!r}")


def _parse_site(fed: str, rest: list[str], topic: str) -> ParsedTopic:
    """``sites/{site}/...`` (``rest`` starts at ``sites``)."""
    site = validate_name("site name", rest[1])
    if len(rest) == 3 and rest[2] in ("status", "bridge"):
        return ParsedTopic(fed, f"site_{rest[2]}", site=site)
    if len(rest) == 5 and rest[2] == "round" and rest[4] in ("partial", "receipt"):
        return ParsedTopic(fed, f"site_{rest[4]}", round_id=_parse_round(rest[3], topic), site=site)
    raise TopicError(f"unknown fedmq topic: {topic!r}")


def sender_of(topic: str) -> str | None:
    """The login a client's topic is attributed to, None for the aggregator's topics.

    ``round/{r}/update/{cid}`` and ``agents/{cid}/status``: the only topics the broker's ACL
    lets a device write, each under its own id; ``sites/{site}/...``: the only ones a site's
    login may write; ``infer/{server}/request/{req}``: the
    requester, whose login the ACL binds to that level. The key of per-sender bounds (a
    transport's inbox, chunk reassembly), so an inference server bounds and serves each
    requester in turn. Cheap (one split, no validation): it runs on the network thread for
    every inbound message; an invalid id is still a key, and the message is refused later by
    :func:`parse`.
    """
    parts = topic.split("/", 7)
    if len(parts) < 6 or f"{parts[0]}/{parts[1]}" != PROTOCOL:
        return None
    if len(parts) == 7 and parts[3] == "round" and parts[5] == "update":
        return parts[6]
    if len(parts) == 7 and parts[3] == "infer" and parts[5] == "request":
        return parts[6]
    if len(parts) == 6 and parts[3] == "agents" and parts[5] == "status":
        return parts[4]
    if len(parts) >= 6 and parts[3] == "sites":  # a site's status and partials: its login
        return parts[4]
    return None


CHUNK_LEVEL = "chunk"


def chunk_topic(topic: str, index: int) -> str:
    """Where chunk ``index`` of a payload too large for one packet on ``topic`` travels."""
    return f"{topic}/{CHUNK_LEVEL}/{index}"


def chunk_subscription(subscription: str) -> str | None:
    """The subscription covering the chunks of ``subscription`` (None: ``#`` covers them)."""
    return None if subscription.endswith("#") else f"{subscription}/{CHUNK_LEVEL}/+"


def _chunks(pattern: str) -> str:
    """The subscription covering every chunk of the topics ``pattern`` matches."""
    return f"{pattern}/{CHUNK_LEVEL}/+"


def split_chunk_topic(topic: str) -> tuple[str, int] | None:
    """``(base topic, chunk index)`` for a chunk topic, None for any other topic."""
    base, sep, index = topic.rpartition(f"/{CHUNK_LEVEL}/")
    if not sep or not base or not index.isdigit() or len(index) > 6:
        return None
    return base, int(index)


def quota_key(topic: str) -> str:
    """Whose per-sender quota a payload on ``topic`` counts against (chunk reassembly).

    The device, for the topics only it may write, and the requester of an inference request
    (:func:`sender_of`); any other topic is a sender of its own.
    """
    return sender_of(topic) or topic


def _round(round_id: int) -> int:
    if (
        not isinstance(round_id, int)
        or isinstance(round_id, bool)
        or not 0 <= round_id <= MAX_ROUND
    ):
        raise TopicError(f"round id must be an int in [0, {MAX_ROUND}], got {round_id!r}")
    return round_id


def _parse_round(text: str, topic: str) -> int:
    if not _ROUND_RE.fullmatch(text):
        raise TopicError(f"bad round id {text!r} in topic {topic!r}")
    return int(text)
