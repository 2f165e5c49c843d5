"""The demo's round table (aggregator/ops/monitor.py) survives what anyone may publish.

On the demo's open broker anyone can publish a status under an invalid client id; the table
reports it and keeps printing rounds (tests/integration/test_hardening_flood.py does the same
over a real broker).
"""

from __future__ import annotations

import pytest

from aggregator.ops.monitor import RoundTable
from shared.protocol import messages as msg
from shared.protocol.topics import Topics

T = Topics("demo")


@pytest.fixture
def table() -> RoundTable:
    return RoundTable("mqtt://127.0.0.1:1883", "demo", rounds_total=3)  # never connected


def _metrics(round_id: int) -> bytes:
    return msg.RoundMetrics(
        federation="demo",
        round=round_id,
        participants=["pi-0"],
        accepted=1,
        rejected=0,
        num_samples=100,
        test_accuracy=0.5,
    ).to_json()


@pytest.mark.parametrize(
    "topic",
    [
        "fl/v1/demo/agents/bad id!/status",
        "fl/v1/demo/agents/[/bold]/status",  # rich markup in a topic is printed, not parsed
        "fl/v1/demo/nonsense",
    ],
)
def test_a_status_under_an_invalid_topic_is_reported_not_raised(
    table: RoundTable, topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = msg.AgentStatus(client_id="pi-0", state="online").to_json()

    table._on_message(topic, status, False)

    assert "bad message on" in capsys.readouterr().out
    assert table.online == {}


def test_rounds_are_still_printed_after_a_bad_topic(
    table: RoundTable, capsys: pytest.CaptureFixture[str]
) -> None:
    table._on_message("fl/v1/demo/agents/bad id!/status", b"{}", False)

    table._on_message(T.metrics, _metrics(1), False)

    assert [m.round for m in table.rows] == [1]
    assert "1/3" in capsys.readouterr().out
