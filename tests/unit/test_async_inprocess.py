"""The asynchronous mode end to end in one process: the real service and agents over the
in-memory broker (docs/async.md). No sleeps: conditions are waited for with a deadline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from aggregator.resume import EXIT_STARVED
from aggregator.service import AggregatorService
from shared.mqtt.base import Session, Transport
from shared.protocol import messages as msg
from tests.unit.inprocess import Federation, T, update_frame, wait_for

ASYNC = {"mode": "async", "min_clients": 1, "round_timeout": 60.0}


def _accepted_receipts(fed: Federation) -> Counter[tuple[str, int]]:
    """(client, base round) of every ``accepted`` receipt sent, lost ones included."""
    return Counter(
        (r.client_id, r.round)
        for m in fed.broker.messages(T.receipt_any)
        if (r := msg.decode(m.payload, msg.Receipt)).status == "accepted"
    )


def _codes(fed: Federation, round_id: int, client: str) -> list[str]:
    return [r.effective_code() for r in fed.receipts(round_id, client)]


def _announcements(fed: Federation, round_id: int) -> list[msg.RoundStart]:
    return [
        msg.decode(m.payload, msg.RoundStart)
        for m in fed.broker.messages(T.round_start(round_id))
        if m.payload
    ]


class Device:
    """A scripted device: publishes hand-made update frames on its own topics."""

    def __init__(self, fed: Federation, service: AggregatorService) -> None:
        self.fed, self.service = fed, service
        self.link: Transport = fed.broker.connector(Session("scripted-devices")).start()
        self.frames: dict[tuple[str, int], bytes] = {}

    def send(self, client: str, round_id: int, base_hash: str) -> None:
        """Publish ``client``'s update of ``round_id`` (the same bytes when sent again)."""
        key = (client, round_id)
        if key not in self.frames:
            self.frames[key] = update_frame(self.service, round_id, client, base_hash=base_hash)
        before = len(self.fed.receipts(round_id, client))
        self.link.publish(T.update(round_id, client), self.frames[key])
        wait_for(lambda: len(self.fed.receipts(round_id, client)) > before, f"{key}'s receipt")


def _version_hash(fed: Federation, version: int) -> str:
    """The hash of model version ``version``: round ``version + 1``'s base."""
    return _announcements(fed, version + 1)[-1].base_hash


def test_agents_train_on_the_newest_model_and_every_k_updates_make_a_version(
    fed: Federation,
) -> None:
    service = fed.start_aggregator(rounds=4, buffer=2, max_staleness=2, **ASYNC)
    for i in range(3):
        fed.start_agent(f"pi-{i}", seed=i + 1)

    codes = fed.finish()

    assert set(codes.values()) == {0}
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["mode"] == "async" and r["accepted"] == 2 for r in rounds)
    assert all(len(r["staleness"]) == 2 and max(r["staleness"]) <= 2 for r in rounds)
    counted = _accepted_receipts(fed)
    assert sum(counted.values()) == 8 and max(counted.values()) == 1  # none counted twice
    assert rounds[-1]["test_accuracy"] > 0.4  # 4 classes: chance is 0.25
    ann = _announcements(fed, 1)[0]
    assert (ann.mode, ann.max_staleness, ann.selected) == ("async", 2, [])
    for agent in fed.agents.values():
        assert agent.sync.model is not None
        assert agent.sync.model.model_hash == service.model_hash


def test_stale_busy_and_duplicate_updates_get_their_codes_and_count_once(
    fed: Federation,
) -> None:
    fed.silent_device("pi-s")
    fed.wait_online("pi-s")
    service = fed.start_aggregator(rounds=3, buffer=2, max_staleness=1, **ASYNC)
    wait_for(lambda: fed.open_round() == 1, "version window 1")
    dev, h1 = Device(fed, service), service.initial_hash
    dev.send("x", 1, h1)
    dev.send("y", 1, h1)
    wait_for(lambda: fed.open_round() == 2, "version window 2")
    h2 = _version_hash(fed, 1)

    dev.send("x", 1, h1)  # the same update again (its receipt lost, say)
    dev.send("z", 1, h1)  # trained on version 0: one behind, counts
    dev.send("z", 2, h2)  # z counts in this window already
    dev.send("x", 2, h2)
    wait_for(lambda: fed.open_round() == 3, "version window 3")
    dev.send("y", 1, h1)  # two behind: over max-staleness 1
    dev.send("z", 2, h2)  # re-sent after the next version, as agents do with "busy"
    dev.send("y", 3, _version_hash(fed, 2))
    assert fed.finish()["aggregator"] == 0

    assert _codes(fed, 1, "x") == ["accepted", "duplicate"]
    assert _codes(fed, 2, "z") == ["busy", "accepted"]
    assert _codes(fed, 1, "y") == ["accepted", "stale"]
    assert [r["staleness"] for r in fed.rounds()] == [[0, 0], [1, 0], [1, 0]]
    assert [r["participants"] for r in fed.rounds()] == [["x", "y"], ["x", "z"], ["y", "z"]]


def test_an_aggregator_stopped_mid_buffer_resumes_losing_nothing_counting_nothing_twice(
    fed: Federation, tmp_path: Path
) -> None:
    settings = {**ASYNC, "min_clients": 3, "max_extensions": 0, "state_dir": str(tmp_path / "s")}
    for name in ("pi-s1", "pi-s2", "pi-s3"):  # three online: the quorum to start
        fed.silent_device(name)
    fed.wait_online("pi-s1", "pi-s2", "pi-s3")
    first = fed.start_aggregator(rounds=2, buffer=3, max_staleness=2, **settings)
    wait_for(lambda: fed.open_round() == 1, "version window 1")
    dev, h1 = Device(fed, first), first.initial_hash
    for client in ("x", "y", "z"):
        dev.send(client, 1, h1)
    wait_for(lambda: fed.open_round() == 2, "version window 2")
    dev.send("w", 1, h1)  # one of window 2's three, journaled
    fed.clock.advance(61.0)  # below quorum at the deadline, no extension: it stops
    assert fed.workers.pop("aggregator").join() == EXIT_STARVED

    resumed = fed.start_aggregator(rounds=2, buffer=3, max_staleness=2, **settings)
    wait_for(lambda: len(_announcements(fed, 2)) == 2, "window 2 announced again")
    dev.service = resumed
    h2 = _version_hash(fed, 1)
    dev.send("x", 1, h1)  # counted in window 1 (the checkpoint's history): a duplicate
    dev.send("w", 1, h1)  # counted in window 2 (the journal): a duplicate
    dev.send("u", 2, h2)
    dev.send("v", 2, h2)
    assert fed.finish()["aggregator"] == 0

    assert _codes(fed, 1, "x") == ["accepted", "duplicate"]
    assert _codes(fed, 1, "w") == ["accepted", "duplicate"]
    second = resumed.metrics.entries[-1]
    assert (second["round"], second["participants"]) == (2, ["u", "v", "w"])
    assert second["staleness"] == [1, 0, 0]
    assert max(_accepted_receipts(fed).values()) == 1


def test_an_update_arriving_between_two_windows_counts_in_the_next_one(
    fed: Federation,
) -> None:
    fed.silent_device("pi-s1")
    away = fed.silent_device("pi-s2")
    fed.wait_online("pi-s1", "pi-s2")
    service = fed.start_aggregator(rounds=2, buffer=2, max_staleness=1, **{**ASYNC,
                                   "min_clients": 2})  # fmt: skip
    wait_for(lambda: fed.open_round() == 1, "version window 1")
    dev, h1 = Device(fed, service), service.initial_hash
    away.leave()  # below min-clients: after window 1, window 2 waits for two devices on-line
    dev.send("x", 1, h1)
    dev.send("y", 1, h1)
    wait_for(lambda: bool(fed.broker.messages(T.round_decision(1))), "version 1 applied")

    dev.link.publish(T.update(1, "z"), update_frame(service, 1, "z", base_hash=h1))
    wait_for(lambda: len(service.windows.held) == 1, "z's update held between the windows")
    fed.silent_device("pi-s2")  # back on-line: window 2 opens and takes z's update
    wait_for(lambda: len(fed.receipts(1, "z")) == 1, "z's receipt")
    dev.send("w", 2, _version_hash(fed, 1))
    assert fed.finish()["aggregator"] == 0

    assert _codes(fed, 1, "z") == ["accepted"]  # counted at once: no no-round, no re-send
    assert fed.rounds()[1]["participants"] == ["w", "z"]
    assert fed.rounds()[1]["staleness"] == [1, 0]
