"""A whole federation in one process: the real service and real agents, no broker, no sleeps.

The in-memory broker stands in for Mosquitto and a manual clock for time, so deadlines and
re-send timers fire exactly when a test moves the clock. tests/integration/ runs the same
protocol over a real broker and real processes.
"""

from __future__ import annotations

import threading

from aggregator.resume import EXIT_STARVED
from aggregator.service import AggregatorService
from shared.mqtt.base import Inbound, Session
from shared.protocol import messages as msg
from tests.unit.inprocess import Federation, T, update_frame, wait_for


def test_an_aggregator_and_three_agents_run_every_round_and_end_on_one_model(
    fed: Federation,
) -> None:
    service = fed.start_aggregator(rounds=3, min_clients=3)
    for i in range(3):
        fed.start_agent(f"pi-{i}", seed=i + 1)

    codes = fed.finish()

    assert codes == {"aggregator": 0, "pi-0": 0, "pi-1": 0, "pi-2": 0}
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["accepted"] == 3 and r["rejected"] == 0 for r in rounds)
    assert all(r["num_samples"] == 3 * 120 for r in rounds)
    assert rounds[-1]["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    for agent in fed.agents.values():
        assert agent.rounds_trained == 3
        assert agent.sync.model is not None
        assert agent.sync.model.model_hash == service.model_hash
        assert agent.outbox.rounds() == []  # every update was acknowledged


def test_a_late_joiner_takes_the_retained_model_and_then_trains(fed: Federation) -> None:
    # A selected device that never trains holds each round open until the test moves the
    # clock past its deadline, so the late agent joins at a known point: round 2 is open.
    silent = fed.silent_device("pi-silent")
    fed.start_agent("pi-0", seed=1)
    fed.start_agent("pi-1", seed=2)
    fed.wait_online("pi-silent", "pi-0", "pi-1")
    service = fed.start_aggregator(rounds=4, min_clients=2, round_timeout=60.0)
    for r in (1, 2):
        wait_for(lambda r=r: _counted(fed, r) == 2, f"round {r}'s two updates")
        if r == 1:
            fed.clock.advance(61.0)

    late = fed.start_agent("pi-late", seed=3)
    wait_for(lambda: late.sync.model is not None, "pi-late holding the retained model")
    silent.leave()
    fed.clock.advance(61.0)
    codes = fed.finish()

    assert set(codes.values()) == {0}
    assert [r["participants"] for r in fed.rounds()] == [["pi-0", "pi-1"]] * 2 + [
        ["pi-0", "pi-1", "pi-late"]
    ] * 2
    assert late.rounds_trained == 2
    assert late.sync.model is not None and late.sync.model.model_hash == service.model_hash


def test_a_lost_receipt_makes_the_agent_resend_and_the_update_counts_once(
    fed: Federation,
) -> None:
    # A selected device that never trains holds round 1 open until its deadline.
    silent = fed.silent_device("pi-silent")
    fed.broker.drop(T.receipt(1, "pi-0"))
    for i in range(3):
        fed.start_agent(f"pi-{i}", seed=i + 1, resend_after_s=10.0)
    fed.wait_online("pi-silent", "pi-0", "pi-1", "pi-2")
    fed.start_aggregator(rounds=1, min_clients=3, round_timeout=60.0)
    wait_for(lambda: len(fed.receipts(1, "pi-1")) == len(fed.receipts(1, "pi-2")) == 1, "2 done")
    wait_for(lambda: len(fed.receipts(1, "pi-0")) == 1, "pi-0's (lost) receipt")

    fed.clock.advance(10.5)  # pi-0 heard nothing for resend_after_s: it re-sends
    wait_for(lambda: len(fed.receipts(1, "pi-0")) == 2, "the receipt of the re-send")
    agent = fed.agents["pi-0"]
    wait_for(lambda: agent.outbox.rounds() == [], "pi-0's outbox cleared by the receipt")
    silent.leave()
    fed.clock.advance(60.0)  # the deadline: applied with the three that reported
    codes = fed.finish()

    assert codes["aggregator"] == 0
    assert len(fed.updates(1, "pi-0")) == 2
    lost, answer = fed.receipts(1, "pi-0")
    assert lost.status == "accepted"
    assert answer.status == "rejected" and answer.reason.startswith("duplicate")
    (applied,) = fed.rounds()
    assert applied["accepted"] == 3 and applied["num_samples"] == 3 * 120
    assert "pi-silent" not in applied["participants"]


def test_a_replayed_update_is_refused_as_a_duplicate_and_not_summed(fed: Federation) -> None:
    silent = fed.silent_device("pi-silent")
    fed.start_agent("pi-0", seed=1)
    fed.start_agent("pi-1", seed=2)
    fed.wait_online("pi-silent", "pi-0", "pi-1")
    service = fed.start_aggregator(rounds=1, min_clients=2, round_timeout=60.0)
    wait_for(lambda: _counted(fed, 1) == 2, "both agents' updates counted")
    replayer = fed.broker.connector(Session("replayer")).start()

    replayer.publish(T.update(1, "pi-1"), fed.updates(1, "pi-1")[0])
    wait_for(lambda: len(fed.receipts(1, "pi-1")) == 2, "the replay's receipt")
    silent.leave()
    fed.clock.advance(60.0)
    codes = fed.finish()

    assert codes["aggregator"] == 0
    first, replay = fed.receipts(1, "pi-1")
    assert (first.status, replay.status) == ("accepted", "rejected")
    assert replay.reason.startswith("duplicate")
    (applied,) = fed.rounds()
    assert applied["accepted"] == 2 and applied["num_samples"] == 2 * 120
    assert service.round_id == 1


def test_bad_updates_get_a_reason_and_the_service_keeps_going(fed: Federation) -> None:
    fed.silent_device("pi-x")
    # Selected and silent: holds round 1 open until the clock moves. Without it, pi-x's
    # first final refusal (it will send nothing more) completes the round as soon as pi-0's
    # update is in, and its next frame may find the round closed (late, not stale base).
    fed.silent_device("pi-quiet")
    fed.start_agent("pi-0", seed=1)
    fed.wait_online("pi-x", "pi-quiet", "pi-0")
    service = fed.start_aggregator(rounds=1, min_clients=1, round_timeout=60.0)
    wait_for(lambda: fed.open_round() == 1, "round 1 announced")
    sender = fed.broker.connector(Session("intruder")).start()

    sender.publish(T.update(1, "pi-x"), b"not a frame")
    sender.publish(T.update(2, "pi-x"), update_frame(service, 2, "pi-x"))
    sender.publish(T.update(1, "pi-x"), update_frame(service, 1, "pi-x", base_hash="0" * 64))
    wait_for(lambda: len(fed.receipts(1, "pi-x")) == 2, "two receipts for round 1")
    wait_for(lambda: len(fed.receipts(2, "pi-x")) == 1, "a receipt for round 2")
    wait_for(lambda: _counted(fed, 1) == 1, "pi-0's update counted")
    fed.clock.advance(60.0)
    codes = fed.finish()

    assert codes["aggregator"] == 0
    garbage, stale = fed.receipts(1, "pi-x")
    (early,) = fed.receipts(2, "pi-x")
    assert garbage.status == stale.status == early.status == "rejected"
    assert garbage.reason.startswith("undecodable")
    assert stale.reason.startswith("stale base model")
    assert early.reason.startswith("wrong round")
    (applied,) = fed.rounds()
    assert applied["participants"] == ["pi-0"] and applied["rejected"] == 1


def test_a_round_below_quorum_at_its_deadline_is_extended_to_newly_online_agents(
    fed: Federation,
) -> None:
    fed.silent_device("pi-silent")
    fed.start_agent("pi-0", seed=1)
    fed.wait_online("pi-silent", "pi-0")
    service = fed.start_aggregator(rounds=1, min_clients=2, round_timeout=30.0)
    wait_for(lambda: _counted(fed, 1) == 1, "pi-0's update counted")
    fed.start_agent("pi-1", seed=2)  # online after the selection: not in round 1 yet
    wait_for(lambda: "pi-1" in service.agents, "the aggregator seeing pi-1 online")

    fed.clock.advance(31.0)
    wait_for(lambda: _decisions(fed) == ["extended"], "the extension")
    wait_for(lambda: _counted(fed, 1) == 2, "pi-1's update, invited by the extension")
    fed.clock.advance(31.0)  # the new deadline: quorum without the silent device
    codes = fed.finish()

    assert codes["aggregator"] == 0
    assert _decisions(fed) == ["extended", "applied"]
    (applied,) = fed.rounds()
    assert applied["participants"] == ["pi-0", "pi-1"]


def test_after_a_broker_restart_the_service_puts_its_retained_state_back(
    fed: Federation,
) -> None:
    fed.silent_device("pi-silent")
    fed.start_aggregator(rounds=1, min_clients=1, max_extensions=0)
    wait_for(lambda: fed.open_round() == 1, "round 1 announced")
    retained = {t: fed.broker.retained(t) for t in (T.global_model, T.global_meta)}

    fed.broker.restart()  # forgets every retained message
    assert fed.broker.retained(T.global_model) is None
    fed.broker.reconnect_all()
    wait_for(lambda: fed.broker.retained(T.global_meta) is not None, "meta re-published")

    assert {t: fed.broker.retained(t) for t in retained} == retained
    assert fed.broker.retained(T.round_start(1)) is not None
    fed.clock.advance(61.0)  # nobody trains: the round fails below quorum, cleanly
    assert fed.finish()["aggregator"] == EXIT_STARVED


def _decisions(fed: Federation) -> list[str]:
    return [
        msg.decode(m.payload, msg.RoundDecision).decision
        for m in fed.broker.messages(T.round_decision(1))
    ]


def _counted(fed: Federation, round_id: int) -> int:
    """How many of ``round_id``'s receipts say accepted (lost ones included)."""
    return sum(
        r.status == "accepted"
        for m in fed.broker.messages(T.receipt_any)
        if (r := msg.decode(m.payload, msg.Receipt)).round == round_id
    )


def test_the_retained_state_put_back_after_a_reconnect_does_not_grow_with_the_rounds(
    fed: Federation,
) -> None:
    # A selected device that never trains holds each round open until the clock passes its
    # deadline; pi-0's update makes the quorum, so each round then closes, applied.
    silent = fed.silent_device("pi-silent")
    fed.start_agent("pi-0", seed=1)
    fed.wait_online("pi-silent", "pi-0")
    service = fed.start_aggregator(rounds=5, min_clients=1)
    for r in (1, 2, 3):
        wait_for(lambda r=r: _counted(fed, r) == 1, f"pi-0's update of round {r}")
        fed.clock.advance(61.0)
    wait_for(lambda: len(fed.rounds()) == 3 and _counted(fed, 4) == 1, "round 4, open")
    current = {
        T.aggregator_status,
        T.global_model,
        T.global_delta,
        T.global_meta,
        T.metrics,
        T.round_start(4),
    }

    assert set(service.publisher.retained) == current  # before: round/1..3/start, cleared, as well
    fed.broker.disconnect("aggregator")
    since = len(fed.broker.log)  # after its will
    fed.broker.reconnect("aggregator")

    def put_back() -> list[tuple[str, bytes]]:
        log = list(fed.broker.log)[since:]
        return [(m.topic, m.payload) for m in log if m.sender == "aggregator" and m.retain]

    wait_for(lambda: len(put_back()) == len(current), "the retained state re-published")
    assert {t for t, _ in put_back()} == current
    assert all(payload for _, payload in put_back())  # no clearance of a closed round
    silent.leave()
    fed.clock.advance(61.0)  # round 4 applied; round 5 is pi-0's alone
    assert fed.finish()["aggregator"] == 0


def test_an_agent_gone_off_line_while_the_service_waits_is_not_selected(fed: Federation) -> None:
    # A part-time device's statuses, on-line then off-line, both in the inbox when the service
    # reaches its quorum of 1 with the first. Returning then, it selected from an empty pool
    # and stopped ("a round needs at least one selected client"); it now waits on.
    service = AggregatorService(
        fed.aggregator_config(min_clients=1), fed.broker.connector, fed.clock
    )
    inbox = service.transport.inbox

    def status(state: str) -> Inbound:
        body = msg.AgentStatus(client_id="pi-x", state=state, num_samples=50)  # type: ignore[arg-type]
        return Inbound(T.agent_status("pi-x"), body.to_json(), False)

    inbox.put(status("online"))
    inbox.put(status("offline"))
    waited: list[bool] = []
    worker = threading.Thread(target=lambda: waited.append(service._wait_for_agents(1, 60.0)))
    worker.start()
    wait_for(lambda: inbox.qsize() == 0, "both statuses read")
    wait_for(lambda: "pi-x" in service.agents, "pi-x known")
    inbox.put(status("online"))  # back on-line
    worker.join(timeout=30)
    assert waited == [True]
    assert service.agents.online() == ["pi-x"]  # what the selection then sees
