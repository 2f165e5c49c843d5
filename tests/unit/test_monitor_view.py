"""The monitor's state and view, from recorded (topic, payload, retain) messages: no broker."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from rich.console import Console

from aggregator.ops.monitor_view import (
    MonitorState,
    add_monitor_arguments,
    monitor_config,
    render,
    subscriptions,
)
from shared.protocol import messages as msg
from shared.protocol.topics import Topics

T = Topics("shop")
H = "a" * 64
NOW = 1_000.0


def _recording() -> list[tuple[str, bytes, bool]]:
    spec = msg.ModelSpec(arch="lenet5")
    start = msg.RoundStart(
        federation="shop",
        round=3,
        base_hash=H,
        deadline=NOW + 42,
        selected=["pi-1", "pi-2", "pi-3"],
        model=spec,
        train=msg.TrainParams(),
    )
    return [
        (
            T.aggregator_status,
            msg.AggregatorStatus(
                federation="shop", state="running", round=3, rounds_total=20
            ).to_json(),
            True,
        ),
        (T.agent_status("pi-1"), msg.AgentStatus(client_id="pi-1", state="online").to_json(), True),
        (
            T.agent_status("pi-2"),
            msg.AgentStatus(client_id="pi-2", state="training", round=3, num_samples=900).to_json(),
            True,
        ),
        (
            T.agent_status("pi-3"),
            msg.AgentStatus(client_id="pi-3", state="offline").to_json(),
            True,
        ),
        (
            T.metrics,
            msg.RoundMetrics(
                federation="shop",
                round=2,
                participants=["pi-1"],
                accepted=1,
                rejected=0,
                num_samples=900,
                test_accuracy=0.8125,
                test_loss=0.5,
                bytes_up=12_000,
            ).to_json(),
            True,
        ),
        (T.round_start(3), start.to_json(), True),
        (
            T.receipt(3, "pi-1"),
            msg.Receipt(round=3, client_id="pi-1", status="accepted").to_json(),
            False,
        ),
        (
            T.receipt(3, "pi-3"),
            msg.Receipt(
                round=3,
                client_id="pi-3",
                status="rejected",
                reason="stale base model 0123, round is on 4567",
                code="stale-base",
            ).to_json(),
            False,
        ),
        ("fl/v1/shop/metrics", b"{not json", False),
    ]


def _state() -> MonitorState:
    state = MonitorState("shop")
    for topic, payload, retain in _recording():
        state.apply(topic, payload, retain, NOW)
    return state


def test_state_follows_round_agents_receipts_and_metrics() -> None:
    state = _state()

    assert state.aggregator == "running" and state.rounds_total == 20
    assert state.current is not None and state.current.round == 3
    assert state.current.accepted == {"pi-1"}
    assert state.current.rejected["pi-3"].code == "stale-base"
    assert state.counts() == {"online": 1, "training": 1, "offline": 1}
    assert [m.round for m in state.history] == [2]
    assert len(state.problems) == 1  # the bad metrics message is shown, not raised


def test_cleared_round_start_marks_round_closed() -> None:
    state = _state()

    state.apply(T.round_start(3), b"", True, NOW)

    assert state.current is not None and state.current.closed


def test_render_shows_round_deadline_agents_and_history() -> None:
    console = Console(record=True, width=140)

    console.print(render(_state(), NOW))
    text = console.export_text()

    assert "round 3/20" in text and "deadline in 42s" in text
    assert "1/3 updates accepted, 1 rejected" in text
    assert "pi-3: stale-base (stale base model 0123, round is on 4567)" in text
    assert "1 online" in text and "1 training" in text and "1 offline" in text
    assert "81.25%" in text and "12.0" in text


def test_render_shows_the_epsilon_spent_and_the_clipping_bound_of_a_dp_federation() -> None:
    state = _state()
    dp = msg.RoundMetrics(
        federation="shop", round=3, participants=["pi-1"], accepted=1, rejected=0,
        num_samples=900, clip_bound=0.75, clipped=1, dp_epsilon=2.5, dp_delta=1e-5,
    )  # fmt: skip
    state.apply(T.metrics, dp.to_json(), True, NOW)
    console = Console(record=True, width=160)

    console.print(render(state, NOW))
    text = console.export_text()

    assert "ε = 2.5 spent after round 3 (δ = 1e-05)" in text
    assert "0.75 (1)" in text


def test_without_dp_the_monitor_shows_no_epsilon() -> None:
    console = Console(record=True, width=160)

    console.print(render(_state(), NOW))

    assert "ε" not in console.export_text()


def test_render_shows_the_code_of_a_receipt_from_an_older_aggregator() -> None:
    state = _state()
    old = msg.Receipt(
        round=3, client_id="pi-2", status="rejected", reason="late: round 3 is closed"
    )
    state.apply(T.receipt(3, "pi-2"), old.to_json(), False, NOW)
    console = Console(record=True, width=140)

    console.print(render(state, NOW))

    assert "pi-2: late (late: round 3 is closed)" in console.export_text()


def test_render_shows_markup_in_a_reason_as_text() -> None:
    state = _state()
    hostile = msg.Receipt(
        round=3, client_id="pi-2", status="rejected", reason="federation '[/x]' is not ours"
    )
    state.apply(T.receipt(3, "pi-2"), hostile.to_json(), False, NOW)
    console = Console(record=True, width=140)

    console.print(render(state, NOW))

    assert "federation '[/x]' is not ours" in console.export_text()


def test_monitor_never_subscribes_to_update_payloads() -> None:
    topics = [t for t, _ in subscriptions(T)]

    assert T.update_any not in topics and T.receipt_any in topics


def _monitor_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_monitor_arguments(parser)
    return parser.parse_args(list(argv))


def test_monitor_reads_its_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")

    cfg = monitor_config(_monitor_args("--username", "monitor", "--password-file", str(secret)))

    assert cfg.connect_options().password == "s3cret"


def test_monitor_reads_its_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_MONITOR_PASSWORD", "from-env")

    cfg = monitor_config(_monitor_args("--username", "monitor"))

    assert cfg.connect_options().password == "from-env"


def test_monitor_reads_broker_identity_and_certificates_from_its_toml(tmp_path: Path) -> None:
    toml = tmp_path / "monitor.toml"
    toml.write_text(
        '[monitor]\nbroker = "mqtts://b:8883"\nfederation = "lab"\nusername = "monitor"\n'
        'password = "pw"\ncert_file = "/c.crt"\nkey_file = "/c.key"\n'
    )

    options = monitor_config(_monitor_args("--config", str(toml))).connect_options()

    assert (options.username, options.password) == ("monitor", "pw")
    assert (options.cert_file, options.key_file) == ("/c.crt", "/c.key")


def test_monitor_refuses_a_password_and_a_password_file_together(tmp_path: Path) -> None:
    args = _monitor_args("--password", "a", "--password-file", str(tmp_path / "p"))

    with pytest.raises(ValueError, match="give one, not both"):
        monitor_config(args)


def test_on_the_central_broker_the_monitor_shows_each_site_its_bridge_and_last_partial() -> None:
    state = MonitorState("shop")
    status = msg.SiteStatus(
        site="factory-1", state="online", devices=40, num_samples=2400, open_round=7, updates=31
    )
    receipt = msg.Receipt(round=6, client_id="factory-1", status="accepted", code="accepted")
    for topic, payload in (
        (T.site_status("factory-1"), status.to_json()),
        (T.site_bridge("factory-1"), b"1"),
        (T.site_receipt(6, "factory-1"), receipt.to_json()),
        (T.site_bridge("factory-2"), b"0"),
    ):
        state.apply(topic, payload, retain=False, now=NOW)
    console = Console(record=True, width=160)
    console.print(render(state, NOW))
    text = console.export_text()

    assert not state.problems
    assert "factory-1" in text and "round 7: 31 updates" in text and "round 6: accepted" in text
    assert "2400" in text and "40" in text
    assert state.sites["factory-2"].bridge == "down"
    subs = {topic for topic, _ in subscriptions(T)}
    assert {T.site_status_any, T.site_bridge_any, T.site_receipt_all} <= subs
