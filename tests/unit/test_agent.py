"""The edge agent on its own: a real EdgeAgent, a scripted aggregator, the in-memory broker.

The test plays the aggregator's part on the wire (retained model, announcements, receipts,
status) and watches what the agent publishes; a manual clock drives its timers.
"""

from __future__ import annotations

import itertools
import queue
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.downloads import model_frame
from edge_agent.agent import EdgeAgent
from shared.clock import ManualClock
from shared.mqtt.base import Inbound, Session
from shared.mqtt.memory import MemoryTransport
from shared.protocol import messages as msg
from shared.protocol.claims import sign_model_v2, sign_round_start, sign_status
from shared.protocol.frames import read_header, tensors_hash
from shared.protocol.signing import generate_keypair, public_pem
from tests.unit.inprocess import FED, INPUT_SHAPE, NUM_CLASSES, Federation, T, Worker, wait_for

_LINKS = itertools.count()
T_ = TypeVar("T_")
SPEC = msg.ModelSpec(arch="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)


class ScriptedAggregator:
    """Publishes what an aggregator would, message by message, as the test says.

    With a ``key`` it signs models and announcements as the real one does, for ``run``.
    """

    def __init__(
        self, fed: Federation, key: Ed25519PrivateKey | None = None, run: int = 0, seed: int = 0
    ) -> None:
        self.fed = fed
        self.key, self.run = key, run
        session = Session(f"aggregator-{next(_LINKS)}")  # one connection each, no takeover
        self.link: MemoryTransport = fed.broker.connector(session).start()
        rng = np.random.default_rng(seed)
        self.params = {
            "1.weight": (rng.standard_normal((200, 64)) * 0.1).astype(np.float32),
            "1.bias": np.zeros(200, np.float32),
            "3.weight": (rng.standard_normal((200, 200)) * 0.1).astype(np.float32),
            "3.bias": np.zeros(200, np.float32),
            "5.weight": (rng.standard_normal((NUM_CLASSES, 200)) * 0.1).astype(np.float32),
            "5.bias": np.zeros(NUM_CLASSES, np.float32),
        }
        self.model_hash = tensors_hash(self.params)

    def publish_model(self, round_id: int = 0) -> None:
        """The retained full global model (signed with the key, if any)."""
        sig = sign_model_v2(self.key, FED, self.run, round_id, self.model_hash) if self.key else ""
        frame = model_frame(FED, round_id, SPEC, self.params, run=self.run, signature_v2=sig)
        self.link.publish(T.global_model, frame, retain=True)

    def announce(
        self,
        round_id: int,
        *selected: str,
        deadline_in: float = 60.0,
        sign: bool = True,
        train: msg.TrainParams | None = None,
        **fields: Any,
    ) -> None:
        """A retained round announcement on the published model (signed unless ``sign`` is off)."""
        now = self.fed.clock.time()  # the aggregator's clock: ts and deadline are on it
        ann = msg.RoundStart(
            ts=now,
            federation=FED,
            round=round_id,
            base_hash=self.model_hash,
            deadline=now + deadline_in,
            selected=list(selected),
            model=SPEC,
            train=train or msg.TrainParams(lr=0.05, seed=round_id),
            **{"codec": "int8", "download_codec": "none", "run": self.run, **fields},
        )
        if self.key is not None and sign:
            ann = sign_round_start(self.key, ann)
        self.link.publish(T.round_start(round_id), ann.to_json(), retain=True)

    def receipt(self, round_id: int, client_id: str, code: str = "accepted") -> None:
        """The answer to an update."""
        status = "accepted" if code == "accepted" else "rejected"
        body = msg.Receipt(round=round_id, client_id=client_id, status=status, code=code)
        self.link.publish(T.receipt(round_id, client_id), body.to_json())

    def status(self, state: str, retain: bool, sign: bool = True) -> None:
        """The aggregator's life-cycle status (signed with the key, unless ``sign`` is off)."""
        body = msg.AggregatorStatus(federation=FED, state=state, run=self.run)  # type: ignore[arg-type]
        if self.key is not None and sign:
            body = sign_status(self.key, body)
        self.link.publish(T.aggregator_status, body.to_json(), retain=retain)


@pytest.fixture
def agg(fed: Federation) -> ScriptedAggregator:
    return ScriptedAggregator(fed)


def _status(fed: Federation, client_id: str) -> str:
    raw = fed.broker.retained(T.agent_status(client_id))
    return msg.decode(raw, msg.AgentStatus).state if raw else "none"


def test_a_selected_agent_trains_once_and_keeps_its_update_until_the_receipt(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    (payload,) = fed.updates(1, "pi-0")
    head = read_header(payload)
    assert (head.round, head.client_id, head.base_hash) == (1, "pi-0", agg.model_hash)
    assert head.num_samples == 120 and agent.outbox.rounds() == [1]
    agg.receipt(1, "pi-0")
    wait_for(lambda: agent.outbox.rounds() == [], "the outbox cleared by the receipt")
    assert agent.rounds_trained == 1 and len(fed.updates(1, "pi-0")) == 1


def test_an_agent_that_is_not_selected_does_not_train(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-9")
    agg.announce(2, "pi-0")  # a later announcement proves the first one was handled

    wait_for(lambda: len(fed.updates(2, "pi-0")) == 1, "the update of round 2")
    assert fed.updates(1, "pi-0") == [] and agent.rounds_trained == 1


def test_an_expired_announcement_is_ignored(fed: Federation, agg: ScriptedAggregator) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-0", deadline_in=-10.0)
    agg.announce(2, "pi-0")

    wait_for(lambda: len(fed.updates(2, "pi-0")) == 1, "the update of round 2")
    assert fed.updates(1, "pi-0") == [] and agent.rounds_trained == 1


def test_without_a_receipt_the_agent_resends_after_its_timeout(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    fed.start_agent("pi-0", seed=1, resend_after_s=20.0)
    agg.announce(1, "pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    fed.clock.advance(20.5)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send")

    first, again = fed.updates(1, "pi-0")
    assert again == first  # the stored frame, not a new training


def test_after_a_reconnect_the_agent_resends_and_says_it_is_online_again(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    fed.broker.disconnect("pi-0")
    assert _status(fed, "pi-0") == "offline"  # its last will
    fed.clock.advance(2.0)
    fed.broker.reconnect("pi-0")

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send after the reconnect")
    wait_for(lambda: _status(fed, "pi-0") == "online", "its birth message")


def _one_turn(agent: EdgeAgent) -> None:
    """Return once the agent's loop has made a whole turn (re-send check included) from now.

    Two messages it ignores (a cleared retained metrics message): the second is taken only
    after the turn that took the first has ended.
    """
    for _ in range(2):
        agent.transport.inbox.put(Inbound(T.metrics, b"", True))
        wait_for(agent.transport.inbox.empty, "the agent's loop to take its message")


def test_a_disconnected_agent_queues_no_resends_and_resends_once_when_reconnected(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    agent = fed.start_agent("pi-0", seed=1, resend_after_s=60.0)
    agg.announce(1, "pi-0", deadline_in=7200.0)  # open all along: only the link stops re-sends
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    link = agent.transport
    assert isinstance(link, MemoryTransport)

    fed.broker.disconnect("pi-0")
    for _ in range(60):  # an hour, one re-send period at a time
        fed.clock.advance(60.0)
        _one_turn(agent)

    assert link.queued == 0  # before: 60 copies waiting for the reconnect
    fed.broker.reconnect("pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send after the reconnect")
    agg.receipt(1, "pi-0")  # handled after the reconnect's messages: no re-send comes later
    wait_for(lambda: agent.outbox.rounds() == [], "the outbox cleared by the receipt")
    assert len(fed.updates(1, "pi-0")) == 2


class SkewedClock:
    """The test's manual clock, with this device's wall clock ``offset_s`` off the aggregator's."""

    def __init__(self, base: ManualClock, offset_s: float) -> None:
        self.base, self.offset_s = base, offset_s

    def time(self) -> float:
        return self.base.time() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()

    def wait(self, inbox: queue.Queue[T_], timeout: float) -> T_ | None:
        return self.base.wait(inbox, timeout)


def _skewed_agent(fed: Federation, offset_s: float, **overrides: Any) -> EdgeAgent:
    cfg = fed.agent_config("pi-0", seed=1, **overrides)
    agent = EdgeAgent(cfg, fed.broker.connector, SkewedClock(fed.clock, offset_s))
    fed.agents["pi-0"], fed.workers["pi-0"] = agent, Worker("pi-0", agent.run)
    return agent


def _sends_at(fed: Federation, agent: EdgeAgent, step_s: float, steps: int) -> list[int]:
    """How many copies of its round-1 update the agent has sent, after each clock step."""
    counts = []
    for _ in range(steps):
        fed.clock.advance(step_s)
        _one_turn(agent)
        counts.append(len(fed.updates(1, "pi-0")))
    return counts


@pytest.mark.parametrize("offset_s", [600.0, -600.0], ids=["10-min-ahead", "10-min-behind"])
def test_an_agent_whose_clock_is_off_follows_a_round_for_its_announced_duration(
    fed: Federation, agg: ScriptedAggregator, offset_s: float
) -> None:
    agg.publish_model()
    agent = _skewed_agent(fed, offset_s, resend_after_s=20.0)
    fed.wait_online("pi-0")

    agg.announce(1, "pi-0", deadline_in=50.0)  # live: its 50 s count from its arrival

    # Before: 10 minutes ahead, it ignored every announcement as expired; behind, it went
    # on re-sending for 10 minutes after the round's end.
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    assert _sends_at(fed, agent, 21.0, 4) == [2, 3, 3, 3]  # timer re-sends until 51 s only


@pytest.mark.parametrize("offset_s", [600.0, -600.0], ids=["10-min-ahead", "10-min-behind"])
def test_a_retained_announcement_is_an_open_round_whatever_the_devices_clock(
    fed: Federation, agg: ScriptedAggregator, offset_s: float
) -> None:
    # The aggregator clears a round's retained announcement when it closes it: one that is
    # still retained is of an open round, however long ago it was published.
    agg.publish_model()
    agg.announce(1, "pi-0", deadline_in=50.0)
    fed.clock.advance(30.0)

    agent = _skewed_agent(fed, offset_s, resend_after_s=20.0)

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    # Open for the 50 s it had left when published, counted from its arrival: bounded.
    assert _sends_at(fed, agent, 21.0, 4) == [2, 3, 3, 3]


def test_a_live_reannouncement_gets_the_update_again_at_once(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    # A restarted aggregator re-announces its open round: an update sent a moment before
    # may have been lost with it, so the agent sends it again without waiting.
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")

    agg.announce(1, "pi-0")

    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send for the re-announcement")


def test_a_restarted_agent_resends_from_its_outbox_instead_of_training_again(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.publish_model()
    first = fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "pi-0's update")
    first.stop()
    fed.workers.pop("pi-0").join()

    again = fed.start_agent("pi-0", seed=1)
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 2, "the re-send from the outbox")

    assert again.rounds_trained == 0
    assert fed.updates(1, "pi-0")[1] == fed.updates(1, "pi-0")[0]


def test_a_retained_finished_status_is_an_old_federation_but_a_live_one_ends_the_agent(
    fed: Federation, agg: ScriptedAggregator
) -> None:
    agg.status("finished", retain=True)
    agg.publish_model()
    fed.start_agent("pi-0", seed=1)
    agg.announce(1, "pi-0")
    wait_for(lambda: len(fed.updates(1, "pi-0")) == 1, "training despite the old status")

    agg.status("finished", retain=False)

    assert fed.workers["pi-0"].join() == 0
    assert _status(fed, "pi-0") == "offline"


def _pinned(fed: Federation, tmp_path: Path) -> tuple[Ed25519PrivateKey, str]:
    """A signing key and the path of its public half, for agents to pin."""
    key = generate_keypair()
    pem = tmp_path / "model.pub"
    pem.write_bytes(public_pem(key))
    return key, str(pem)


def test_an_agent_pinned_to_a_key_refuses_an_unsigned_model(
    fed: Federation, tmp_path: Path
) -> None:
    key, pem = _pinned(fed, tmp_path)
    agg = ScriptedAggregator(fed, key)
    ScriptedAggregator(fed).publish_model()  # the same weights, unsigned
    agent = fed.start_agent("pi-0", seed=1, model_public_key=pem)
    agg.announce(1, "pi-0")
    agg.announce(2, "pi-1")  # handled after the model: the model was seen by then
    wait_for(lambda: agent.announcement is not None and agent.announcement.round == 2, "round 2")

    assert agent.sync.model is None
    assert fed.updates(1, "pi-0") == []


def test_the_agent_worker_stops_cleanly_when_asked(fed: Federation) -> None:
    agent = fed.start_agent("pi-0", seed=1)
    fed.wait_online("pi-0")

    agent.stop()

    assert fed.workers["pi-0"].join() == 0
    assert _status(fed, "pi-0") == "offline"
