"""Sites, the parts without a broker: partials in the round sum and the intake, the roster of
sites, the partial's frame and outbox, which rounds a device follows; and a site aggregator
restarted mid-round over an in-memory broker (its journal)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.intake import UpdateIntake
from aggregator.roster import AgentRoster
from aggregator.round_strategy import RoundStrategy, strategy_settings
from aggregator.rounds import RoundState
from aggregator.site_partials import PartialEncoder, PartialOutbox
from aggregator.site_service import SiteAggregator
from aggregator.strategy import AggregationError
from edge_agent.announcements import selects
from shared.clock import ManualClock
from shared.mqtt.base import Session
from shared.mqtt.memory import MemoryBroker
from shared.protocol import messages as msg
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame
from shared.protocol.topics import Topics
from tests.unit.inprocess import wait_for

FED = "plant"
T = Topics(FED)
SHAPES = {"w": (2, 2), "b": (3,)}
Tensors = dict[str, np.ndarray]


def _delta(seed: int, scale: float = 1.0) -> Tensors:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SHAPES.items()}


def _strategy(**overrides: Any) -> RoundStrategy:
    cfg = replace(AggregatorConfig(), **overrides)
    return RoundStrategy(strategy_settings(cfg), SHAPES, np.random.default_rng(0))


def _norm(d: Tensors) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))


def test_a_partial_is_counted_unclipped_with_its_samples_beside_clipped_devices() -> None:
    # The partial's 30 of 40 samples are over max_weight_share (0.5): a site is not capped.
    agg = _strategy(clip="fixed", clip_bound=0.5).open_round(2)
    device, partial = _delta(1), _delta(2, 0.1)
    agg.add(device, 10, "pi-0")
    agg.add_partial(partial, 30, "site-a")
    mean = agg.mean_delta()

    clipped = {n: v * np.float32(0.5 / _norm(device)) for n, v in device.items()}
    for n in SHAPES:  # the device clipped to 0.5; the partial as it is (its site clipped)
        np.testing.assert_allclose(mean[n], (10 * clipped[n] + 30 * partial[n]) / 40, rtol=1e-5)
    assert agg.count == 2 and len(agg.norms) == 1  # the bound learns from devices only


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        ({"robust": "median"}, "robust rule"),
        ({"dp_noise_multiplier": 1.0, "dp_expected_clients": 3}, "differential"),
    ],
)
def test_a_partial_is_refused_where_the_rule_needs_each_devices_update(
    overrides: dict[str, Any], rule: str
) -> None:
    agg = _strategy(**overrides).open_round(3)
    with pytest.raises(AggregationError, match=rule):
        agg.add_partial(_delta(1, 0.1), 30, "site-a")
    assert agg.count == 0


def _frame(client: str, n: int, base: str = "b" * 64, round_id: int = 1) -> bytes:
    header = FrameHeader(
        kind="update",
        federation=FED,
        round=round_id,
        client_id=client,
        base_hash=base,
        codec="fp32",
        num_samples=n,
    )
    return encode_frame(header, _delta(n, 0.01)).payload


def _roster() -> AgentRoster:
    roster = AgentRoster(lambda *_a: None)
    status = msg.SiteStatus(site="site-a", state="online", devices=3, num_samples=300)
    roster.on_site_status(T.site_status("site-a"), status.to_json())
    return roster


def test_the_intake_caps_a_sites_samples_by_the_devices_behind_it() -> None:
    roster = _roster()
    state = RoundState(1, "b" * 64, {"site-a"}, 1, 60.0, 0.0)
    agg = _strategy(clip="none").open_round(1)
    intake = UpdateIntake(
        FED, state, agg, 10**6, None, max_samples=100, declared=roster.declared_samples,
        site_devices=roster.site_devices,
    )  # fmt: skip

    over = intake.offer(1, "site-a", _frame("site-a", 301))  # over its declared 300
    assert over.verdict.code == "too-many-samples"
    state.rejected.clear()
    ok = intake.offer(1, "site-a", _frame("site-a", 300))  # 3 devices × max 100: fits
    assert ok.verdict.accepted
    assert agg.partials == 1 and state.accepted == {"site-a": 300}


def test_the_roster_selects_online_sites_with_devices_and_refuses_a_foreign_status() -> None:
    warned: list[str] = []
    roster = AgentRoster(lambda _s, fmt, *a: warned.append(fmt % a))
    empty = msg.SiteStatus(site="site-b", state="online", devices=0)
    roster.on_site_status(T.site_status("site-b"), empty.to_json())
    roster.on_site_status(T.site_status("site-a"), msg.SiteStatus(site="site-c", state="online",
                                                                  devices=2).to_json())  # fmt: skip
    roster.on_site_status(T.site_status("site-a"), b"{not json")
    assert roster.online() == []  # site-b has no device; the others were refused
    assert len(warned) == 2
    ok = msg.SiteStatus(site="site-a", state="online", devices=2, num_samples=50)
    roster.on_site_status(T.site_status("site-a"), ok.to_json())
    assert roster.online() == ["site-a"]
    assert roster.site_devices("site-a") == 2 and roster.site_devices("pi-0") == 0
    assert roster.declared_samples("site-a") == 50


def test_a_device_follows_rounds_selecting_it_or_its_site() -> None:
    ann = msg.RoundStart(
        federation=FED, round=1, base_hash="b" * 64, deadline=1.0, selected=["pi-0", "site-a"],
        model=msg.ModelSpec(arch="mlp"), train=msg.TrainParams(),
    )  # fmt: skip
    assert selects(ann, "pi-0")
    assert selects(ann, "pi-9", "site-a")
    assert not selects(ann, "pi-9", "site-b")
    assert not selects(ann, "pi-9")


def _ann(round_id: int = 1, codec: str = "fp32", selected: tuple[str, ...] = ("site-a",)) -> Any:
    return msg.RoundStart(
        federation=FED, round=round_id, base_hash="b" * 64, deadline=1e12,
        selected=list(selected), model=msg.ModelSpec(arch="mlp", input_shape=(8,),
                                                     num_classes=4),
        train=msg.TrainParams(), codec=codec,
    )  # fmt: skip


def test_a_fp32_partial_carries_the_mean_and_the_total_samples() -> None:
    enc = PartialEncoder(FED, "site-a")
    delta = _delta(3, 0.1)
    payload = enc.encode(_ann(), delta, 240, {"site_devices": 2})
    frame = decode_frame(payload)
    assert frame.header.client_id == "site-a" and frame.header.num_samples == 240
    assert frame.header.meta["site_devices"] == 2
    for n in SHAPES:
        np.testing.assert_array_equal(frame.tensors[n], delta[n])


def test_a_biased_codec_keeps_what_the_partial_did_not_carry_and_a_late_one_is_owed() -> None:
    enc = PartialEncoder(FED, "site-a")
    delta = {"w": np.arange(64, dtype=np.float32).reshape(8, 8) / 64}
    payload = enc.encode(_ann(codec="topk:0.1"), delta, 10, {})
    sent = decode_frame(payload).tensors
    np.testing.assert_allclose(sent["w"] + enc.feedback.residual["w"], delta["w"], atol=1e-6)
    enc.give_back(payload)  # refused as late: everything is owed again
    np.testing.assert_allclose(enc.feedback.residual["w"], delta["w"], atol=1e-6)


def test_the_outbox_keeps_partials_on_disk_until_answered(tmp_path: Path) -> None:
    box = PartialOutbox(tmp_path)
    box.put(3, b"three")
    box.put(2, b"two")
    again = PartialOutbox(tmp_path)  # a restarted site
    assert again.rounds() == [2, 3] and again.pending[3] == b"three"
    assert again.done(2) == b"two"
    assert PartialOutbox(tmp_path).rounds() == [3]
    assert PartialOutbox(None).rounds() == []


def _site(
    broker: MemoryBroker, clock: ManualClock, state_dir: Path, clip: str = "none"
) -> SiteAggregator:
    cfg = AggregatorConfig(
        federation=FED, site="site-a", clip=clip, model="mlp", input_shape=(8,),
        num_classes=4, state_dir=str(state_dir),
    )  # fmt: skip
    return SiteAggregator(cfg, broker.connector, clock)


def _device_frame(site: SiteAggregator, client: str, n: int) -> bytes:
    assert site.strategy is not None
    rng = np.random.default_rng(n)
    delta = {
        k: (rng.standard_normal(s) * 0.01).astype(np.float32)
        for k, s in site.strategy.shapes.items()
    }
    header = FrameHeader(
        kind="update", federation=FED, round=1, client_id=client, base_hash="b" * 64,
        codec="fp32", num_samples=n,
    )  # fmt: skip
    return encode_frame(header, delta).payload


def test_a_restarted_site_replays_its_journaled_updates_and_sends_one_partial(
    tmp_path: Path,
) -> None:
    from tests.unit.inprocess import Worker

    clock = ManualClock()
    broker = MemoryBroker(clock)
    central = broker.connector(Session("central", ((T.site_partial_any, 1),))).start()
    devices = broker.connector(Session("devices", ((T.receipt_any, 1),))).start()
    for cid, n in (("pi-0", 40), ("pi-1", 60)):
        status = msg.AgentStatus(client_id=cid, state="online", num_samples=n)
        devices.publish(T.agent_status(cid), status.to_json(), retain=True)
    first = _site(broker, clock, tmp_path)
    worker = Worker("site", first.run)
    central.publish(T.round_start(1), _ann().to_json(), retain=True)
    wait_for(lambda: first.current is not None and first.strategy is not None, "round 1 open")
    devices.publish(T.update(1, "pi-0"), _device_frame(first, "pi-0", 40))
    wait_for(lambda: "pi-0" in first.current.state.accepted, "pi-0 counted")  # type: ignore[union-attr]
    first.stop()  # stands for a crash: nothing was sent up
    assert worker.join() == 0
    assert not broker.messages(T.site_partial_any)

    second = _site(broker, clock, tmp_path)
    worker = Worker("site", second.run)  # the retained announcement re-opens round 1
    wait_for(lambda: second.current is not None, "round 1 re-opened")
    wait_for(lambda: second.strategy is not None, "the model built")
    devices.publish(T.update(1, "pi-1"), _device_frame(second, "pi-1", 60))
    wait_for(lambda: len(broker.messages(T.site_partial_any)) == 1, "the partial")
    second.stop()
    assert worker.join() == 0

    (partial,) = broker.messages(T.site_partial_any)
    head = decode_frame(partial.payload).header
    assert head.client_id == "site-a" and head.num_samples == 100  # pi-0 replayed, pi-1 new
    assert PartialOutbox(tmp_path).rounds() == [1]  # no receipt yet: it would be re-sent


def test_the_central_journal_remembers_which_updates_were_sites_partials(tmp_path: Path) -> None:
    from aggregator.journal import RoundJournal

    journal = RoundJournal(tmp_path)
    journal.announce(4, "b" * 64, ["pi-0", "site-a"], 60.0, 0, {})
    journal.accept(4, "pi-0", 10, _frame("pi-0", 10, round_id=4))
    journal.accept(4, "site-a", 300, _frame("site-a", 300, round_id=4), site=True)
    jr = journal.load(4)
    assert jr is not None and RoundJournal.sites(jr) == ["site-a"]
    roster = AgentRoster(lambda *_a: None)
    roster.note_site("site-a")  # a restarted aggregator, before the site's status arrives
    assert roster.site_devices("site-a") == 1 and roster.site_devices("pi-0") == 0


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"site": "site-a", "robust": "median"}, "robust rule or differential privacy"),
        ({"site": "site-a", "dp_noise_multiplier": 1.0, "dp_expected_clients": 4}, "privacy"),
        ({"site": "site-a", "mode": "async", "buffer": 2}, "synchronous rounds only"),
        ({"site": "bad/name"}, "site"),
        ({"site": "site-a", "site_margin": 1.0}, "site-margin"),
        ({"site": "site-a", "partial_codec": "int3"}, "partial-codec"),
        ({"central_key": "k.pem"}, "give --site too"),
    ],
)
def test_site_settings_that_cannot_work_are_refused_at_start(
    overrides: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        AggregatorConfig(**overrides)


def test_fedmq_aggregator_with_site_runs_the_site_role(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aggregator.cli import main

    # A missing key: the site role is built (it loads the central key first) and refuses.
    assert main(["--site", "site-a", "--central-key", str(tmp_path / "none.pem")]) == 1
    assert "none.pem" in caplog.text


def test_an_unanswered_partial_is_not_resent_into_a_cut_uplink(tmp_path: Path) -> None:
    from tests.unit.inprocess import Worker

    clock = ManualClock()
    broker = MemoryBroker(clock)
    bridge = broker.connector(Session("bridge")).start()  # Mosquitto's notification, here
    PartialOutbox(tmp_path).put(1, b"partial of round 1")  # from before a restart
    site = _site(broker, clock, tmp_path)
    worker = Worker("site", site.run)

    def sent() -> int:
        return len(broker.messages(T.site_partial(1, "site-a")))

    wait_for(lambda: sent() == 1, "the pending partial sent at start")
    bridge.publish(T.site_bridge("site-a"), b"0", retain=True)
    wait_for(lambda: not site.uplink_up, "the uplink seen down")
    clock.advance(31.0)
    bridge.publish(T.site_bridge("site-a"), b"0", retain=True)  # a message: the loop turns
    clock.advance(31.0)
    bridge.publish(T.site_bridge("site-a"), b"1", retain=True)  # back: its queue delivers
    wait_for(lambda: site.uplink_up, "the uplink seen back")
    assert sent() == 1  # nothing re-sent while it was down, nor at once when back
    clock.advance(31.0)  # still no receipt 30 s after it came back: sent again
    wait_for(lambda: sent() == 2, "the re-send after the uplink came back")
    site.stop()
    assert worker.join() == 0


def test_int8_partials_carry_their_rounding_into_the_next_so_it_does_not_add_up() -> None:
    enc = PartialEncoder(FED, "site-a")
    deltas = [_delta(10 + r, 0.05) for r in range(20)]
    sent_sum = {n: np.zeros(s, np.float64) for n, s in SHAPES.items()}
    for r, delta in enumerate(deltas, start=1):
        payload = enc.encode(_ann(round_id=r, codec="int8"), delta, 10, {})
        for n, v in decode_frame(payload).tensors.items():
            sent_sum[n] += v
    for n in SHAPES:  # what was sent in all equals what was summed, but for the last residual
        true = sum(d[n].astype(np.float64) for d in deltas)
        np.testing.assert_allclose(sent_sum[n] + enc.feedback.residual[n], true, atol=1e-5)
        assert np.abs(enc.feedback.residual[n]).max() < 0.05  # one round's rounding at most


def test_a_site_may_send_its_partials_with_another_codec_than_its_devices() -> None:
    enc = PartialEncoder(FED, "site-a", codec="fp16")
    payload = enc.encode(_ann(codec="int8"), _delta(4, 0.1), 10, {})
    assert decode_frame(payload).header.codec == "fp16"


def test_a_device_joining_round_one_of_adaptive_clipping_is_counted(tmp_path: Path) -> None:
    from tests.unit.inprocess import Worker

    clock = ManualClock()
    broker = MemoryBroker(clock)
    central = broker.connector(Session("central")).start()
    devices = broker.connector(Session("devices", ((T.receipt_any, 1),))).start()
    status = msg.AgentStatus(client_id="pi-0", state="online", num_samples=40)
    devices.publish(T.agent_status("pi-0"), status.to_json(), retain=True)
    site = _site(broker, clock, tmp_path, clip="adaptive")  # round 1 holds its updates
    worker = Worker("site", site.run)
    central.publish(T.round_start(1), _ann().to_json(), retain=True)
    wait_for(lambda: site.current is not None and site.strategy is not None, "round 1 open")
    assert site.current is not None and site.current.state.selected == {"pi-0"}
    devices.publish(T.update(1, "pi-1"), _device_frame(site, "pi-1", 60))  # joins: no status
    devices.publish(T.update(1, "pi-0"), _device_frame(site, "pi-0", 40))
    wait_for(lambda: len(broker.messages(T.site_partial_any)) == 1, "the partial")
    site.stop()
    assert worker.join() == 0

    codes = [msg.decode(m.payload, msg.Receipt).code for m in broker.messages(T.receipt_any)]
    assert codes == ["accepted", "accepted"]
    (partial,) = broker.messages(T.site_partial_any)
    assert decode_frame(partial.payload).header.num_samples == 100


def test_a_site_claiming_more_devices_than_allowed_is_capped_in_its_samples() -> None:
    warned: list[str] = []
    roster = AgentRoster(lambda _s, fmt, *a: warned.append(fmt % a), max_site_devices=2)
    inflated = msg.SiteStatus(site="site-a", state="online", devices=10**6, num_samples=10**9)
    roster.on_site_status(T.site_status("site-a"), inflated.to_json())
    assert roster.site_devices("site-a") == 2 and "counted as 2" in warned[0]
    state = RoundState(1, "b" * 64, {"site-a"}, 1, 60.0, 0.0)
    intake = UpdateIntake(
        FED, state, _strategy(clip="none").open_round(1), 10**6, None, max_samples=100,
        declared=roster.declared_samples, site_devices=roster.site_devices,
    )  # fmt: skip
    assert intake.offer(1, "site-a", _frame("site-a", 201)).verdict.code == "too-many-samples"
