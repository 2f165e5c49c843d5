"""What the device does with a receipt, per code (edge_agent/outbox.py, EdgeAgent._on_receipt).

The agent tests drive a real EdgeAgent on an in-memory broker it never connects to: a receipt
goes in through its dispatcher, and its outbox file and error-feedback residual are checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.outbox import COUNTED_CODES, MISSED_CODES, receipt_is_final
from shared.mqtt.base import Inbound
from shared.mqtt.memory import MemoryBroker
from shared.protocol import topics
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame
from shared.protocol.messages import Receipt
from shared.protocol.receipts import RECEIPT_CODES, ReceiptCode
from shared.runtime.data import ArrayDataset, save_npz

FED, CLIENT, ROUND = "lab", "pi-1", 3
T = topics.Topics(FED)

# code → (final: the outbox lets the update go, counted, owed: its mass goes back to the
# residual). Every code must have a row.
DECISIONS: dict[ReceiptCode, tuple[bool, bool, bool]] = {
    "accepted": (True, True, False),
    "duplicate": (True, True, False),
    "late": (True, False, True),
    "stale-base": (True, False, True),
    "wrong-round": (False, False, False),
    "no-round": (False, False, False),
    "not-selected": (True, False, False),
    "malformed": (True, False, False),
    "too-large": (True, False, False),
    "over-norm": (True, False, False),
    "non-finite": (True, False, False),
    "too-many-samples": (True, False, False),
    "rate-limited": (False, False, False),
    "wrong-model": (True, False, False),
    "stale": (True, False, True),
    "busy": (False, False, False),
}


# --- the decision table -----------------------------------------------------------------
def test_every_code_has_a_decision() -> None:
    assert set(DECISIONS) == set(RECEIPT_CODES)


@pytest.mark.parametrize("code", RECEIPT_CODES)
def test_decision_per_code(code: ReceiptCode) -> None:
    final, counted, owed = DECISIONS[code]

    assert receipt_is_final(code) is final
    assert (code in COUNTED_CODES) is counted
    assert (code in MISSED_CODES) is owed


# --- the agent ----------------------------------------------------------------------------
@pytest.fixture
def agent(tmp_path: Path) -> EdgeAgent:
    data = tmp_path / "data.npz"
    save_npz(data, ArrayDataset(np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4, np.int64)))
    cfg = AgentConfig(
        federation=FED, client_id=CLIENT, data=str(data), state_dir=str(tmp_path / "state")
    )
    a = EdgeAgent(cfg, MemoryBroker().connector)
    a.outbox.put(ROUND, _topk_update())
    return a


def _topk_update() -> bytes:
    head = FrameHeader(
        kind="update",
        federation=FED,
        round=ROUND,
        codec="topk:0.5",
        client_id=CLIENT,
        base_hash="a" * 64,
        num_samples=4,
    )
    delta = {"w": np.arange(1, 9, dtype=np.float32).reshape(2, 4)}
    return encode_frame(head, delta, rng=np.random.default_rng(0)).payload


def _receive(agent: EdgeAgent, code: ReceiptCode | None, reason: str = "") -> None:
    status = "accepted" if code == "accepted" else "rejected"
    receipt = Receipt(round=ROUND, client_id=CLIENT, status=status, reason=reason, code=code)
    agent._dispatch(Inbound(T.receipt(ROUND, CLIENT), receipt.to_json(), retain=False))


@pytest.mark.parametrize("code", RECEIPT_CODES)
def test_agent_keeps_the_update_only_for_a_retryable_code(
    agent: EdgeAgent, code: ReceiptCode
) -> None:
    _receive(agent, code)

    assert (agent.outbox.get(ROUND) is None) is DECISIONS[code][0]


@pytest.mark.parametrize("code", RECEIPT_CODES)
def test_agent_gives_back_the_mass_only_of_a_missed_update(
    agent: EdgeAgent, code: ReceiptCode
) -> None:
    sent = decode_frame(_topk_update()).tensors

    _receive(agent, code)

    residual = agent.feedback.ef.residual
    if DECISIONS[code][2]:
        assert np.array_equal(residual["w"], sent["w"])
    else:
        assert residual == {}


def test_no_round_keeps_the_update_and_gives_nothing_back(agent: EdgeAgent) -> None:
    # The old reason-text rule listed "no round" as owed, but it was retryable first and so
    # never matched: the update stays to be re-sent, and its mass is not given back.
    _receive(agent, None, reason="no round is open")

    assert agent.outbox.get(ROUND) == _topk_update()
    assert agent.feedback.ef.residual == {}


def test_agent_decides_an_older_aggregators_late_receipt_by_its_text(agent: EdgeAgent) -> None:
    _receive(agent, None, reason=f"late: round {ROUND} is closed")

    assert agent.outbox.get(ROUND) is None
    assert "w" in agent.feedback.ef.residual


def test_agent_ignores_a_receipt_for_another_client(agent: EdgeAgent) -> None:
    receipt = Receipt(round=ROUND, client_id="pi-2", status="accepted", code="accepted")

    agent._dispatch(Inbound(T.receipt(ROUND, CLIENT), receipt.to_json(), retain=False))

    assert agent.outbox.get(ROUND) == _topk_update()
